"""A stand-in HF hub cache: the repositories the paper configs name, filled with tiny models and a few rows.

The networked route (`bildexp run task=iwslt policy=bild`, every conf/experiment/*/paper.yaml) reads models
through `from_pretrained(<hub id>)` and data through `huggingface_hub.snapshot_download(<dataset id>,
revision=...)`. With HF_HUB_OFFLINE=1 both resolve from the huggingface_hub cache alone, so a folder laid out
as that cache (`models--owner--name/refs/<revision>` holding a commit id, `snapshots/<commit>/<files>`) and
named by HF_HUB_CACHE lets the tests walk the same code a user with the hub walks.

The ids, revisions, configs, splits and field names below are written out from the hub, NOT read from the
configs: a config that names a wrong one fails to load here as it would on the hub. The models are saved
the way the published checkpoints were (transformers 4.x: a config.json with the 4.x keys, a pickled
pytorch_model.bin): mT5 with an untied head and `tie_word_embeddings: false`, T5 v1.0 with a tied head, and
vocabulary rows beyond the tokenizer's (250,112 rows for mT5's 250,100 tokens, 32,128 for T5's 32,100; here
the stand-in tokenizer's 512 tokens plus 12 or 28).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

PARQUET_EXPORT = "refs/convert/parquet"

# Models: repo id -> (kind, decoder layers). Tokenizers: repo id -> the project's tiny tokenizer that stands in.
MT5_MODELS = {
    **{f"kssteven/mT5-{size}-{task}-de-en{suffix}": ("mt5", 3)
       for task in ("iwslt2017", "wmt2014") for size, suffix in (("large", ""), ("small", ""), ("small", "-bild-aligned"))},
    # CALM's fine-tuned mT5-small (BiLD Figure 7), published by the BiLD authors: 8 decoder layers in truth.
    "kssteven/mT5-small-iwslt2017-calm-ft": ("mt5", 4),
    "kssteven/mT5-small-wmt2014-calm-ft": ("mt5", 4),
    "google/mt5-small": ("mt5", 3),
}
T5_MODELS = {
    **{f"kssteven/T5-{size}-{task}{suffix}": ("t5", 3)
       for task in ("xsum", "cnndm") for size, suffix in (("large", ""), ("small", ""), ("small", "-bild-aligned"))},
    "google-t5/t5-small": ("t5", 3),
}
LLAMA_MODELS = {"lmsys/vicuna-13b-v1.3": ("llama", 40)}  # Vicuna-13B v1.3 has 40 decoder layers
TOKENIZERS = {"google/mt5-small": "tiny_t5", "google-t5/t5-small": "tiny_t5", "lmsys/vicuna-13b-v1.3": "tiny_llama"}
EXTRA_ROWS = {"mt5": 12, "t5": 28, "llama": 0}  # checkpoint vocabulary rows beyond the tokenizer's

# Datasets: repo id -> (config, {split: rows}, row builder). All read from the parquet export revision.
def _translation(src: str, tgt: str):
    return lambda i, ex: {"translation": {src: ex["source"], tgt: ex["reference"]}}


DATASETS = {
    "IWSLT/iwslt2017": ("iwslt2017-de-en", {"validation": 4, "train": 20}, _translation("de", "en")),
    "wmt/wmt14": ("de-en", {"validation": 4, "train": 20}, _translation("de", "en")),
    "wmt/wmt15": ("fr-en", {"test": 4}, _translation("en", "fr")),
    "EdinburghNLP/xsum": ("default", {"validation": 4, "train": 20},
                          lambda i, ex: {"document": ex["source"], "summary": ex["reference"], "id": f"x{i}"}),
    "abisee/cnn_dailymail": ("3.0.0", {"validation": 4, "test": 4, "train": 20},
                             lambda i, ex: {"article": ex["source"], "highlights": ex["reference"], "id": f"c{i}"}),
    "rajpurkar/squad": ("plain_text", {"validation": 4},
                        lambda i, ex: {"id": f"q{i}", "title": "toy", "context": ex["source"], "question": "What follows?",
                                       "answers": {"text": [ex["reference"]], "answer_start": [0]}}),
}
# XSUM's validation split holds documents with an empty text; one stands in for them (the task drops it).
EMPTY_DOCUMENT = ("EdinburghNLP/xsum", "validation")


def _commit(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def _snapshot(cache: Path, kind: str, repo: str, revision: str = "main") -> Path:
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    commit = _commit(repo, revision)
    ref = root / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    folder = root / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tiny_tokenizer(name: str):
    from transformers import AutoTokenizer

    from bildexp.testbeds.tiny import ensure_tiny_pair

    folder = ensure_tiny_pair(name) / "large"
    return folder, AutoTokenizer.from_pretrained(folder)


def _model(kind: str, layers: int, vocab: int, tok, seed: int):
    """A random tiny model of the checkpoint's class, and its config as transformers 4.x wrote it."""
    from transformers import LlamaConfig, LlamaForCausalLM, MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                             bos_token_id=tok.bos_token_id, **ids)
        model, extra = LlamaForCausalLM(config), {"architectures": ["LlamaForCausalLM"]}
    else:
        mt5 = kind == "mt5"
        config = (MT5Config if mt5 else T5Config)(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,  # symmetric, as every kssteven T5
            feed_forward_proj="gated-gelu" if mt5 else "relu", decoder_start_token_id=tok.pad_token_id, **ids)
        model = (MT5ForConditionalGeneration if mt5 else T5ForConditionalGeneration)(config)
        # transformers 4.25 wrote tie_word_embeddings only where it differs from the default: mT5's untied head.
        extra = {"architectures": [type(model).__name__], **({"tie_word_embeddings": False} if mt5 else {})}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "mt5":
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"])  # its own head, as mT5 v1.1 has
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("scale_decoder_outputs", "tie_word_embeddings", "dtype")}
    return state, {**config_dict, **extra, "transformers_version": "4.25.0.dev0"}


def punkt(folder: Path) -> Path:
    """An untrained NLTK punkt_tab model (empty parameter files: it splits after . ! ? followed by a capital or
    space), standing in for the one `python -m nltk.downloader punkt_tab` fetches; `folder` goes on NLTK's path."""
    english = folder / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).touch()
    return folder


def build(cache: Path) -> dict[str, list[str]]:
    """Fill `cache` (an HF_HUB_CACHE folder) → what it holds: {"models": [...], "datasets": [...]}."""
    from bildexp.testbeds.toy import toy_examples

    cache.mkdir(parents=True, exist_ok=True)
    tokenizers = {}
    for repo, tiny in TOKENIZERS.items():
        folder, tok = _tiny_tokenizer(tiny)
        tokenizers[repo] = tok
        snap = _snapshot(cache, "model", repo)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(folder / name, snap / name)
    for seed, (repo, (kind, layers)) in enumerate({**MT5_MODELS, **T5_MODELS, **LLAMA_MODELS}.items()):
        tok = tokenizers["google/mt5-small" if kind == "mt5" else "google-t5/t5-small" if kind == "t5" else "lmsys/vicuna-13b-v1.3"]
        state, config = _model(kind, layers, len(tok) + EXTRA_ROWS[kind], tok, seed)
        snap = _snapshot(cache, "model", repo)
        torch.save(state, snap / "pytorch_model.bin")
        (snap / "config.json").write_text(json.dumps(config, indent=2))

    import pyarrow as pa
    import pyarrow.parquet as pq

    examples = toy_examples("test") + toy_examples("train")
    for repo, (config, splits, make_row) in DATASETS.items():
        snap = _snapshot(cache, "dataset", repo, PARQUET_EXPORT)
        for split, n in splits.items():
            rows = [make_row(i, examples[i % len(examples)]) for i in range(n)]
            if (repo, split) == EMPTY_DOCUMENT:
                rows.append(make_row(n, {"source": "", "reference": "a summary of nothing"}))
            (snap / config / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), snap / config / split / "0000.parquet")
    return {"models": sorted({*TOKENIZERS, *MT5_MODELS, *T5_MODELS, *LLAMA_MODELS}), "datasets": sorted(DATASETS)}
