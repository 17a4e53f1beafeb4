"""Tiny model pairs built deterministically from scratch (no hub access).

Two pairs are available (``TINY_PAIRS``):

* ``tiny_t5``    -- ``T5ForConditionalGeneration`` large + small
* ``tiny_llama`` -- ``LlamaForCausalLM`` large + small

Both members of a pair share one byte-level BPE tokenizer fitted on the toy
task (``bildexp.testbeds.toy``) and are trained for a few hundred AdamW steps on the toy
train split, so that the large model is mostly right, the small model is
clearly worse, and the two disagree on a fraction of tokens -- which is what a
Big Little Decoder needs to be exercised meaningfully.

``ensure_tiny_pair(name)`` returns ``<root>/<name>-v<RECIPE_VERSION>/`` with
``large/`` and ``small/`` sub-folders, each a complete Hugging Face folder
(config, ``model.safetensors`` in float32, generation config, tokenizer). The
build is deterministic: two builds produce byte-identical weights.

Prompt format for the causal pair: ``TOY_PROMPT_TEMPLATE.format(source=...)``
tokenized *with* special tokens (the tokenizer prepends ``<s>``); the model
then continues with ``" " + reference`` followed by ``</s>``. Decoded
continuations should be ``.strip()``-ed. The seq2seq pair takes the bare source
(the tokenizer appends ``</s>``) and produces the reference.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bildexp.testbeds import Build

__all__ = [
    "TINY_PAIRS",
    "RECIPE_VERSION",
    "TOY_PROMPT_TEMPLATE",
    "tiny_root",
    "ensure_tiny_pair",
]

TINY_PAIRS: tuple[str, ...] = ("tiny_t5", "tiny_llama")
RECIPE_VERSION = 1
TOY_PROMPT_TEMPLATE = "{source} =>"

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
_SPECIALS = (PAD, EOS, UNK, BOS)  # ids 0, 1, 2, 3
VOCAB_SIZE = 512
MAX_NEW_TOKENS = 48  # generation default; toy references are < 30 tokens


def tiny_root() -> Path:
    from bildexp import cache_root

    return cache_root() / "tiny"


# --------------------------------------------------------------------------- #
# recipes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _ModelRecipe:
    d_model: int
    layers: int  # T5: encoder and decoder layers each; Llama: decoder layers
    heads: int
    d_ff: int
    steps: int
    lr: float
    seed: int
    batch_size: int = 32
    # T5's relative-position bias starts near zero and, at the base learning rate,
    # takes ~1000 Adam steps to grow enough to make attention position-aware;
    # a larger learning rate for just those 32 x heads parameters fixes that.
    rel_bias_lr_mult: float = 30.0


_RECIPES: dict[str, dict[str, _ModelRecipe]] = {
    "tiny_t5": {
        "large": _ModelRecipe(d_model=128, layers=2, heads=8, d_ff=256, steps=350, lr=3e-3, seed=11),
        "small": _ModelRecipe(d_model=64, layers=1, heads=4, d_ff=128, steps=300, lr=3e-3, seed=12),
    },
    "tiny_llama": {
        "large": _ModelRecipe(d_model=128, layers=3, heads=4, d_ff=256, steps=250, lr=3e-3, seed=21),
        "small": _ModelRecipe(d_model=64, layers=1, heads=2, d_ff=128, steps=300, lr=3e-3, seed=22),
    },
}


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #


def _training_texts() -> list[str]:
    from bildexp.testbeds.toy import toy_examples

    texts = []
    for row in toy_examples("train"):
        texts.append(row["source"])
        texts.append(row["reference"])
        texts.append(TOY_PROMPT_TEMPLATE.format(source=row["source"]) + " " + row["reference"])
    return texts


def _fit_bpe(texts: list[str], vocab_size: int):
    """Byte-level BPE fitted on ``texts``; returns a ``tokenizers.Tokenizer``.

    The merges are computed here in plain Python with a fully specified tie
    break (highest count, then lexicographically smallest pair) so that the
    vocabulary is identical on every run; the ``tokenizers`` library's own
    trainer can break ties differently between processes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    assert len(vocab) == len(_SPECIALS) + 256

    words = {w: list(w) for w in sorted(counts)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for w, syms in words.items():
            c = counts[w]
            for a, b in zip(syms, syms[1:]):
                pair_counts[(a, b)] += c
        if not pair_counts:
            break
        best = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if pair_counts[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(best)
        vocab[merged] = len(vocab)
        for w, syms in words.items():
            if len(syms) < 2:
                continue
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIALS))
    return tok


def _make_hf_tokenizer(kind: str):
    """``PreTrainedTokenizerFast`` for ``kind`` in {"t5", "llama"}."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _fit_bpe(_training_texts(), VOCAB_SIZE)
    ids = {t: tok.token_to_id(t) for t in _SPECIALS}
    assert [ids[t] for t in _SPECIALS] == [0, 1, 2, 3], ids
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, ids[EOS])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token=PAD,
            eos_token=EOS,
            unk_token=UNK,
            model_max_length=512,
            padding_side="right",
        )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
        padding_side="left",
    )


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #


def _make_model(kind: str, r: _ModelRecipe, vocab_size: int):
    import torch

    torch.manual_seed(r.seed)
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(
            vocab_size=vocab_size,
            d_model=r.d_model,
            d_kv=r.d_model // r.heads,
            d_ff=r.d_ff,
            num_layers=r.layers,
            num_decoder_layers=r.layers,
            num_heads=r.heads,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=64,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        model = T5ForConditionalGeneration(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=r.d_model,
            intermediate_size=r.d_ff,
            num_hidden_layers=r.layers,
            num_attention_heads=r.heads,
            num_key_value_heads=r.heads,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    gc = model.generation_config
    gc.max_new_tokens = MAX_NEW_TOKENS
    gc.do_sample = False
    gc.pad_token_id = 0
    gc.eos_token_id = 1
    if kind == "t5":
        gc.decoder_start_token_id = 0
    else:
        gc.bos_token_id = 3
    return model.float()


def _encode_examples(kind: str, tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels use -100 where no loss is taken."""
    out = []
    for row in rows:
        if kind == "t5":
            src = tokenizer(row["source"])["input_ids"]  # ends with </s>
            tgt = tokenizer(row["reference"])["input_ids"]  # ends with </s>
            out.append((src, tgt))
        else:
            prompt_text = TOY_PROMPT_TEMPLATE.format(source=row["source"])
            prompt = tokenizer(prompt_text)["input_ids"]  # starts with <s>
            cont = tokenizer(" " + row["reference"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            out.append((prompt + cont, [-100] * len(prompt) + cont))
    return out


def _pad(seqs: list[list[int]], value: int):
    import torch

    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


def _length_bucketed_batches(data, batch_size: int, rng: random.Random, bucket: int = 4):
    """Endless deterministic batches: shuffle, then sort each window of
    ``bucket`` batches by length (less padding), then shuffle batch order."""
    while True:
        perm = list(range(len(data)))
        rng.shuffle(perm)
        window = batch_size * bucket
        for start in range(0, len(perm) - batch_size + 1, window):
            chunk = sorted(
                perm[start : start + window], key=lambda i: (len(data[i][0]) + len(data[i][1]), i)
            )
            group = [
                chunk[j : j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)
            ]
            rng.shuffle(group)
            for idx in group:
                yield [data[i] for i in idx]


def _train(kind: str, model, data, r: _ModelRecipe) -> float:
    import torch

    rng = random.Random(r.seed)
    rel = [p for n, p in model.named_parameters() if "relative_attention_bias" in n]
    rest = [p for n, p in model.named_parameters() if "relative_attention_bias" not in n]
    groups = [{"params": rest, "lr_mult": 1.0}]
    if rel:
        groups.append({"params": rel, "lr_mult": r.rel_bias_lr_mult, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, r.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return r.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, r.steps - warmup)
        return r.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    batches = _length_bucketed_batches(data, r.batch_size, rng)
    model.train()
    loss_val = float("nan")
    for step in range(r.steps):
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_mult"]
        if kind == "t5":
            input_ids = _pad([b[0] for b in batch], 0)
            labels = _pad([b[1] for b in batch], -100)
            out = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels)
        else:
            input_ids = _pad([b[0] for b in batch], 0)
            labels = _pad([b[1] for b in batch], -100)
            attn = _pad([[1] * len(b[0]) for b in batch], 0)
            out = model(input_ids=input_ids, attention_mask=attn, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = float(out.loss.detach())
    model.eval()
    return loss_val


def _build_pair(name: str, dest: Path) -> None:
    from transformers.utils import logging as hf_logging

    from bildexp.testbeds.toy import toy_examples

    kind = "t5" if name == "tiny_t5" else "llama"
    tokenizer = _make_hf_tokenizer(kind)
    data = _encode_examples(kind, tokenizer, toy_examples("train"))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in CI logs
    try:
        for role in ("large", "small"):
            r = _RECIPES[name][role]
            t0 = time.perf_counter()
            model = _make_model(kind, r, len(tokenizer))
            loss = _train(kind, model, data, r)
            n_params = sum(p.numel() for p in model.parameters())
            out_dir = dest / role
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
            print(
                f"[bildexp.tiny] built {name}/{role}: {n_params / 1e6:.2f}M params, {r.steps} steps, "
                f"final loss {loss:.3f}, {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            del model
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _is_complete(pair_dir: Path) -> bool:
    return all(
        (pair_dir / role / f).is_file() for role in ("large", "small") for f in _REQUIRED_FILES
    )


def ensure_tiny_pair(name: str, root: Path | None = None) -> Path:
    """Return ``<root>/<name>-v<RECIPE_VERSION>/`` (holding ``large/`` and ``small/``),
    building it first if it is missing. ``root`` defaults to ``tiny_root()``.

    The build goes into a temporary sibling folder that is ``os.replace``-d into
    place, so an interrupted build never leaves a half-written pair behind and
    concurrent builders are safe (the first to finish wins; the result is
    identical anyway). Takes roughly 20-30 s per pair on one CPU thread.
    """
    if name not in TINY_PAIRS:
        raise ValueError(f"unknown tiny pair {name!r}; valid names: {', '.join(TINY_PAIRS)}")
    root = Path(root).expanduser() if root is not None else tiny_root()
    final = root / f"{name}-v{RECIPE_VERSION}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    if final.exists() and not _is_complete(final):
        # Incomplete folder not written by this module (its builds are atomic).
        shutil.rmtree(final, ignore_errors=True)

    import torch

    from bildexp import start_build

    prev_threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    tmp = start_build(final)
    try:
        torch.set_num_threads(1)
        _build_pair(name, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same build first; keep theirs.
            if not _is_complete(final):
                raise
    finally:
        torch.set_num_threads(prev_threads)
        torch.random.set_rng_state(rng_state)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


BUILDS = [
    Build(name, ("large", "small"), partial(ensure_tiny_pair, name),
          f"tiny {kind} pair trained here on the toy task (~30 s)", default=True)
    for name, kind in zip(TINY_PAIRS, ("T5", "Llama"))
]
