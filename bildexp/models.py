"""Load a model pair (hub id, local folder or project-built tiny pair), check vocabularies, set dtype/device.

A pair is a large and a small model that share one vocabulary, both encoder-decoder or both
decoder-only. Loading errors become one-line `BildexpError`s that say what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from bildexp import PROJECT_ROOT, BildexpError, hub_offline
from bildexp.cache import StaticDecoder, bucket, check_cache_keyword
from bildexp.config import PairConfig
from bildexp.quant import quantize
from bildexp.testbeds import is_builtin, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPair:
    large: PreTrainedModel
    small: PreTrainedModel
    tokenizer: object
    is_encoder_decoder: bool
    # Every id that ends generation (chat models often declare several, e.g. end-of-turn and end-of-text).
    eos_token_ids: tuple[int, ...]
    decoder_start_token_id: int | None
    device: torch.device
    dtype: torch.dtype
    # BiLD's early-exit variant: the small model is the first N decoder layers of `large` (small is large).
    small_layers: int | None = None
    # pair.cache=static: each model's preallocated cache and (compiled) forward, by role; None: dynamic caches.
    static: dict[str, StaticDecoder] | None = None

    def prepare_static(self, prompts: list, max_new_tokens: int, max_pass_tokens: int) -> dict[str, float]:
        """Before timing, on the static path: room for the longest of these prompts (`policies.Prompt`s) grown by
        max_new_tokens and a pass of max_pass_tokens, then every pass shape compiled (`StaticDecoder.warmup`).
        → compile_s and compiled_graphs over both models, this call only ({} on the dynamic path)."""
        if not self.static:
            return {}
        decoder_len = max(len(p.decoder_prefix) for p in prompts) + max_new_tokens + bucket(max_pass_tokens)
        source_len = max(0 if p.encoder_input_ids is None else p.encoder_input_ids.shape[1] for p in prompts)
        before = {role: (d.stats.compile_s, d.stats.graphs) for role, d in self.static.items()}
        for decoder in self.static.values():
            decoder.reserve(decoder_len, source_len)
            decoder.warmup(max_pass_tokens)
        return {
            "compile_s": round(sum(d.stats.compile_s - before[r][0] for r, d in self.static.items()), 2),
            "compiled_graphs": sum(d.stats.graphs - before[r][1] for r, d in self.static.items()),
        }

    def late_compiles(self) -> int:
        """Graphs compiled after a warm-up so far (0 on the dynamic path)."""
        return sum(d.stats.late for d in self.static.values()) if self.static else 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BildexpError("pair.device=cuda but no CUDA device is visible: use pair.device=cpu or auto")
    return torch.device(name)


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """bfloat16 on a GPU without it (a T4: compute capability 7.5) would be emulated slowly or fail: one line."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise BildexpError(f"pair.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bfloat16 support: use "
                           "pair.dtype=float32 (float16 overflows in T5 and mT5)")


def resolve_path(name: str) -> str:
    """builtin:<name>/<role> → the folder of a project-built model (built on first use); a relative
    folder missing from the working directory but present in the project (testbeds/...) → that folder;
    else unchanged (a hub id or a folder)."""
    if not is_builtin(name):
        in_project = PROJECT_ROOT / name
        if not Path(name).is_absolute() and not Path(name).exists() and in_project.exists():
            return str(in_project)
        return name
    return str(resolve(name))


def _load_error(name: str, what: str, err: Exception) -> BildexpError:
    if Path(name).exists():
        return BildexpError(f"cannot load {what} from folder {name}: {str(err).splitlines()[0]}")
    if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return BildexpError(f"{what} folder {name} not found: check the path (a hub id is owner/name)")
    if hub_offline():
        hint = "the HF hub is off (HF_HUB_OFFLINE=1)"
    else:
        hint = "the HF hub is unreachable or the id is wrong"
    return BildexpError(
        f"cannot load {what} {name!r}: {hint}; download it on a machine with network access "
        f"(huggingface-cli download {name}) or set the pair's path to a local folder"
    )


def load_model(name: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    path = resolve_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(path, "model", err) from None
    model = model.to(device).eval()
    check_cache_keyword(model)  # an older transformers would decode every step without context
    return model


def load_tokenizer(name: str):
    path = resolve_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(path, "tokenizer", err) from None


def resize_to_tokenizer(model: PreTrainedModel, n: int) -> None:
    """Keep the first n rows of the input embeddings and of the LM head: what the official BiLD code's
    `resize_token_embeddings(len(tokenizer))` does to the kssteven checkpoints (mT5: 250,112 rows to 250,100
    tokens; T5: 32,128 to 32,100), so that every softmax the fallback and rollback rules read covers the
    tokenizer's tokens only. Not transformers' resize_token_embeddings: in transformers 5 it ties an mT5
    checkpoint's own head to the input embeddings (its config forces tie_word_embeddings)."""
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = head.weight.shape[0]
    if n > rows:
        raise BildexpError(f"pair.resize_to_tokenizer: the tokenizer has {n} tokens but {model.name_or_path} only {rows} "
                           f"vocabulary rows; use the model's own tokenizer or pair.resize_to_tokenizer=false")
    if n == rows:
        return
    tied = head.weight is inputs.weight
    embedding = torch.nn.Embedding(n, inputs.weight.shape[1], device=inputs.weight.device, dtype=inputs.weight.dtype)
    embedding.weight.data = inputs.weight.data[:n].clone()
    model.set_input_embeddings(embedding)
    new_head = torch.nn.Linear(head.weight.shape[1], n, bias=False, device=head.weight.device, dtype=head.weight.dtype)
    new_head.weight = embedding.weight if tied else torch.nn.Parameter(head.weight.data[:n].clone())
    model.set_output_embeddings(new_head)
    model.config.vocab_size = n


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocabularies(cfg: PairConfig, large, small, tokenizer) -> None:
    """Same architecture family, same vocabulary size, and the same ids for a sample of tokens."""
    if large.config.is_encoder_decoder != small.config.is_encoder_decoder:
        raise BildexpError(f"pair {cfg.name}: one model is encoder-decoder and the other is not; pick two of one kind")
    vl, vs = _vocab_size(large), _vocab_size(small)
    if vl != vs:
        raise BildexpError(f"vocabulary mismatch in pair {cfg.name}: large has {vl} rows, small {vs}; use models with one tokenizer")
    if cfg.tokenizer is not None:
        return  # one explicit tokenizer serves both models
    try:
        small_tok = AutoTokenizer.from_pretrained(resolve_path(cfg.small))
    except (OSError, ValueError):
        return  # the small model ships no tokenizer of its own: the large one's is used
    n = min(len(tokenizer), len(small_tok))
    sample = sorted({int(i) for i in torch.linspace(0, n - 1, steps=min(n, 256))})
    a, b = tokenizer.convert_ids_to_tokens(sample), small_tok.convert_ids_to_tokens(sample)
    diff = [i for i, x, y in zip(sample, a, b) if x != y]
    if len(tokenizer) != len(small_tok) or diff:
        raise BildexpError(
            f"vocabulary mismatch in pair {cfg.name}: the tokenizers differ (sizes {len(tokenizer)} vs {len(small_tok)}, "
            f"{len(diff)} of {len(sample)} sampled ids); set pair.tokenizer to one shared tokenizer or use matching models"
        )


def assemble_pair(name: str, large, small, tokenizer, device: torch.device, dtype: torch.dtype) -> ModelPair:
    """Two loaded models (or one model twice, for training and single-model decoding) → ModelPair."""
    gen = large.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise BildexpError(f"pair {name}: neither the large model nor the tokenizer defines an eos token")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    start = large.config.decoder_start_token_id if large.config.is_encoder_decoder else None
    return ModelPair(large, small, tokenizer, bool(large.config.is_encoder_decoder), eos_ids, start, device, dtype)


def load_pair(cfg: PairConfig) -> ModelPair:
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    check_dtype(dtype, device)
    if cfg.build:
        for name in (cfg.large, cfg.small):
            if not is_builtin(name) and not Path(resolve_path(name)).exists():
                raise BildexpError(f"model folder {name} of pair {cfg.name} not found: build it with `{cfg.build}`")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.large)
    large = load_model(cfg.large, dtype, device)
    if cfg.resize_to_tokenizer:
        resize_to_tokenizer(large, len(tokenizer))
    n = cfg.early_exit.small_layers
    if n is not None:  # one model; its first n layers are the small one
        from bildexp.layerwise import decoder_layers

        total = len(decoder_layers(large))
        if not 1 <= n < total:
            raise BildexpError(f"pair.early_exit.small_layers={n} must be in [1, {total - 1}]: {cfg.large} has {total} decoder layers")
        quantize(large, cfg.large_quant, cfg.quant_group_size, "pair.large_quant", cfg.quant_dense_rows, cfg.quant_head_group_size)
        pair = assemble_pair(cfg.name, large, large, tokenizer, device, dtype)
        pair.small_layers = n
        return pair
    small = load_model(cfg.small, dtype, device)
    if cfg.resize_to_tokenizer:
        resize_to_tokenizer(small, len(tokenizer))
    check_vocabularies(cfg, large, small, tokenizer)
    # After the vocabulary check (it reads the LM heads' rows) and before any static decoder compiles the forwards.
    for role, model, mode in (("large", large, cfg.large_quant), ("small", small, cfg.small_quant)):
        quantize(model, mode, cfg.quant_group_size, f"pair.{role}_quant", cfg.quant_dense_rows, cfg.quant_head_group_size)
    pair = assemble_pair(cfg.name, large, small, tokenizer, device, dtype)
    if cfg.cache == "static":
        try:
            pair.static = {role: StaticDecoder(model, cfg.compile, cfg.freeze) for role, model in (("large", large), ("small", small))}
        except ValueError as err:
            raise BildexpError(f"pair {cfg.name}: {err}") from None
    return pair


class PairCache:
    """Keeps loaded pairs across the jobs of one multirun (Hydra runs them in one process)."""

    def __init__(self) -> None:
        self._pairs: dict[str, ModelPair] = {}

    def get(self, cfg: PairConfig) -> ModelPair:
        # Every pair setting that changes what load_pair builds (the name, build hint and threads do not).
        key = repr({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "build", "threads")})
        if key not in self._pairs:
            self._pairs.clear()  # one pair in memory at a time
            self._pairs[key] = load_pair(cfg)
        return self._pairs[key]
