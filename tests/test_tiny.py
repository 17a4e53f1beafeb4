"""Tests for the toy task (bildexp.testbeds.toy) and the tiny model pairs (bildexp.testbeds.tiny).

The pairs are built once into ``tiny_root()`` (set BILDEXP_CACHE to control
where); the first run trains four tiny models (~45 s on one CPU thread), later
runs reuse the cache.
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from bildexp.testbeds.tiny import TINY_PAIRS, TOY_PROMPT_TEMPLATE, ensure_tiny_pair, tiny_root  # noqa: E402
from bildexp.testbeds.toy import toy_examples  # noqa: E402

N_CHECK = 20


# --------------------------------------------------------------------------- #
# toy task (pure Python)
# --------------------------------------------------------------------------- #


def test_toy_examples_shape_and_determinism():
    sizes = {"train": 4000, "validation": 200, "test": 200}
    for split, size in sizes.items():
        rows = toy_examples(split)
        assert len(rows) == size
        assert rows == toy_examples(split)  # deterministic
        assert toy_examples(split, 7) == rows[:7]  # n gives a prefix
        for row in rows[:50]:
            assert set(row) == {"id", "source", "reference"}
            assert all(isinstance(v, str) and v for v in row.values())
            assert 4 <= len(row["source"].split()) <= 10
            assert len(row["reference"].split()) == len(row["source"].split())
    assert len({r["id"] for s in sizes for r in toy_examples(s)}) == sum(sizes.values())
    assert toy_examples("train", 5) != toy_examples("test", 5)
    assert len({r["source"] for r in toy_examples("test")}) > 150  # varied inputs
    with pytest.raises(ValueError):
        toy_examples("dev")


# --------------------------------------------------------------------------- #
# tiny pairs
# --------------------------------------------------------------------------- #


def _auto_cls(name: str):
    return AutoModelForSeq2SeqLM if name == "tiny_t5" else AutoModelForCausalLM


@pytest.fixture(scope="session")
def pairs():
    """{name: (tokenizer, large, small)} loaded from freshly built / cached folders."""
    out = {}
    for name in TINY_PAIRS:
        path = ensure_tiny_pair(name)
        assert path == tiny_root() / path.name
        tok = AutoTokenizer.from_pretrained(path / "large")
        cls = _auto_cls(name)
        large = cls.from_pretrained(path / "large").eval()
        small = cls.from_pretrained(path / "small").eval()
        out[name] = (tok, large, small)
    return out


def _encode(name: str, tok, source: str):
    if name == "tiny_t5":
        return tok(source, return_tensors="pt")
    return tok(TOY_PROMPT_TEMPLATE.format(source=source), return_tensors="pt")


@torch.no_grad()
def _greedy(name: str, model, tok, source: str) -> list[int]:
    """Generated continuation ids (no decoder-start / prompt), eos included if produced."""
    enc = _encode(name, tok, source)
    out = model.generate(**enc, do_sample=False, max_new_tokens=48)
    start = 1 if name == "tiny_t5" else enc["input_ids"].shape[1]
    return out[0, start:].tolist()


@torch.no_grad()
def _teacher_forced_argmax(name: str, model, tok, source: str, seq: list[int]) -> list[int]:
    """Argmax next-token prediction at each position of ``seq`` given its prefix."""
    enc = _encode(name, tok, source)
    if name == "tiny_t5":
        dec = torch.tensor([[model.config.decoder_start_token_id] + seq])
        logits = model(**enc, decoder_input_ids=dec).logits[0, : len(seq)]
    else:
        p = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], torch.tensor([seq])], dim=1)
        logits = model(input_ids=ids).logits[0, p - 1 : p - 1 + len(seq)]
    return logits.argmax(-1).tolist()


def test_unknown_pair_name():
    with pytest.raises(ValueError, match="tiny_t5"):
        ensure_tiny_pair("tiny_gpt5")


@pytest.mark.parametrize("name", TINY_PAIRS)
def test_pair_folders_and_shared_vocab(pairs, name):
    path = ensure_tiny_pair(name)  # cached: returns immediately
    assert path.name.startswith(f"{name}-v")
    for role in ("large", "small"):
        assert (path / role / "model.safetensors").is_file()
        assert (path / role / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    tok, large, small = pairs[name]
    small_tok = AutoTokenizer.from_pretrained(path / "small")
    assert small_tok.get_vocab() == tok.get_vocab()
    assert large.config.vocab_size == small.config.vocab_size == len(tok)
    assert all(p.dtype == torch.float32 for p in large.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small * 3 < n_large
    assert tok.eos_token_id == large.generation_config.eos_token_id == 1
    assert tok.pad_token_id == 0
    if name == "tiny_t5":
        assert tok("x")["input_ids"][-1] == tok.eos_token_id  # T5-style: appends </s>
        assert large.config.decoder_start_token_id == 0
    else:
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # Llama-style: prepends <s>
        assert tok.chat_template is None


@pytest.mark.parametrize("name", TINY_PAIRS)
def test_tokenizer_roundtrips_any_utf8(pairs, name):
    tok = pairs[name][0]
    rng = random.Random(0)
    samples = ["Grüße 東京 🙂", "", " lead and trail  ", "tab\tnew\nline\r\n", "\x00\x7f€𝄞"]
    # Random code points from several planes (no surrogates).
    ranges = [
        (0x20, 0x7E), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
        (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF),
    ]
    for _ in range(30):
        chars = []
        for _ in range(rng.randint(1, 20)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        samples.append("".join(chars))
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s
        assert tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s


@pytest.mark.parametrize("name", TINY_PAIRS)
def test_large_outputs_vary_and_terminate(pairs, name):
    tok, large, _ = pairs[name]
    rows = toy_examples("test", N_CHECK)
    outs = [_greedy(name, large, tok, r["source"]) for r in rows]
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    assert len(set(texts)) >= N_CHECK // 2
    assert sum(tok.eos_token_id in o for o in outs) >= 0.8 * N_CHECK
    # The large model has actually learned the task (exact match on most rows).
    assert sum(t == r["reference"] for t, r in zip(texts, rows)) >= N_CHECK // 2


@pytest.mark.parametrize("name", TINY_PAIRS)
def test_small_and_large_partially_disagree(pairs, name):
    tok, large, small = pairs[name]
    agree = total = 0
    for row in toy_examples("test", N_CHECK):
        seq = _greedy(name, large, tok, row["source"])
        large_argmax = _teacher_forced_argmax(name, large, tok, row["source"], seq)
        assert large_argmax == seq  # teacher forcing reproduces greedy decoding
        small_argmax = _teacher_forced_argmax(name, small, tok, row["source"], seq)
        agree += sum(a == b for a, b in zip(small_argmax, seq))
        total += len(seq)
    agreement = agree / total
    assert 0.3 < agreement < 0.99, f"{name}: small/large argmax agreement {agreement:.3f}"


def test_a_killed_build_leaves_no_folder_behind(tmp_path):
    """Build folders of killed builders (their pid gone, or no pid file) are removed when the next build starts;
    a running builder's folder is kept."""
    import os
    import subprocess

    from bildexp import start_build

    final = tmp_path / "pair-v1"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("dead", str(dead.pid)), ("alive", str(os.getpid())), ("nopid", None)):
        folder = tmp_path / f".pair-v1.tmp-{name}"
        folder.mkdir()
        if pid:
            (folder / "pid").write_text(pid)
    new = start_build(final)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".pair-v1.tmp-alive", new.name]) and (new / "pid").read_text() == str(os.getpid())
