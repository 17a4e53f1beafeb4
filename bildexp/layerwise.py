"""Layer-wise execution of a T5/MT5 or Llama-family decoder: the module every early-exit method runs on.

`LayerwiseDecoder` holds one example's decoder state (encoder output and KV cache) like
`cache.ModelState`, but runs the decoder one slice of layers at a time:

    embed(tokens)              token ids [1, k] → hidden states [1, k, D]
    run(h, lo, hi)             layers lo..hi-1 over the next k positions of those layers
    head(h)                    the exit head: final norm + shared LM head (or a trained per-layer head)
    propagate(h, lo, hi)       CALM's state propagation: K/V of layers lo..hi-1 computed from h, so that
                               later tokens can attend to a token that exited early
    crop(n, lo, hi)            forget cached tokens >= n in layers lo..hi-1

Each layer keeps its own cached length, so different layers may have seen different numbers of tokens
(BiLD's early-exit variant runs the first layers ahead of the rest). Layers are counted from 0 here;
user-facing exit layers (CALM's counters, `small_layers`) count from 1 = "after the first layer".

It calls the models' own decoder layers, norms and heads (never a copy of their maths), except for
`propagate`, which applies a layer's own K/V projections (and rotary embedding) without running it.
Running all layers reproduces the model's forward logits (tests/test_early_exit.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from bildexp import BildexpError
from bildexp.timing import PROMPT_CLOCK


# Model types whose decoder layers, embeddings and heads `LayerwiseDecoder` drives as their own forward
# does (tested). Others of the family differ in ways that matter here (Gemma scales embeddings, Qwen3
# normalises keys, Mistral may use a sliding window), so they are refused rather than run wrongly.
SUPPORTED = {"t5": "encoder-decoder", "mt5": "encoder-decoder", "llama": "decoder-only", "qwen2": "decoder-only"}


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    kind = SUPPORTED.get(model.config.model_type)
    if kind is None:
        raise BildexpError(f"layer-wise execution (early exit, CALM) supports {', '.join(SUPPORTED)} models, "
                           f"not {model.config.model_type}: use one of those or extend bildexp/layerwise.py")
    return model.decoder.block if kind == "encoder-decoder" else model.model.layers


def exit_head(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    """Hidden states [..., D] after any decoder layer → logits [..., V] through the final norm and LM head."""
    if model.config.is_encoder_decoder:
        h = model.decoder.final_layer_norm(h)
        if _rescales_decoder_output(model.config):
            h = h * model.model_dim**-0.5  # T5 with tied embeddings rescales before the shared head
    else:
        h = model.model.norm(h)
    return model.lm_head(h)


def _rescales_decoder_output(config) -> bool:
    """Whether T5-style models scale the last hidden state by d_model^-0.5 before the LM head, as their
    own forward does: transformers 5.23 keeps it in T5Config.scale_decoder_outputs (MT5 never rescales,
    and its config forces tie_word_embeddings=True); earlier releases rescaled T5 with tied embeddings."""
    flag = getattr(config, "scale_decoder_outputs", None)
    if flag is not None:
        return bool(flag)
    return config.model_type == "t5" and bool(config.tie_word_embeddings)


class ExitHead(torch.nn.Module):
    """A trained exit head for one layer (PPD's per-layer classifier): a copy of the model's final norm and
    LM head, trained on the hidden state after that layer while the model stays frozen."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        final_norm = model.decoder.final_layer_norm if model.config.is_encoder_decoder else model.model.norm
        self.norm = copy.deepcopy(final_norm)
        weight = model.get_output_embeddings().weight  # [V, D]
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
        rescale = model.config.is_encoder_decoder and _rescales_decoder_output(model.config)
        self.scale = model.model_dim**-0.5 if rescale else 1.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h [..., D] → logits [..., V]; starts out equal to the shared head
        return self.proj(self.norm(h) * self.scale)


class ExitHeads(torch.nn.ModuleDict):
    """Trained exit heads keyed by their 1-based layer; saved as exit_heads.safetensors + exit_heads.json."""

    def __init__(self, model: PreTrainedModel, layers: list[int]):
        n = len(decoder_layers(model))
        if not layers or any(not 1 <= layer < n for layer in layers):
            raise BildexpError(f"exit heads {layers}: use layers in [1, {n - 1}] of this {n}-layer decoder")
        super().__init__({str(layer): ExitHead(model) for layer in sorted(set(layers))})

    def items(self):  # (int layer, head), in layer order
        return [(int(k), v) for k, v in super().items()]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / "exit_heads.safetensors"))
        (folder / "exit_heads.json").write_text(json.dumps({"layers": [layer for layer, _ in self.items()]}) + "\n")

    @classmethod
    def load(cls, folder: str | Path, model: PreTrainedModel) -> "ExitHeads":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "exit_heads.json").is_file():
            raise BildexpError(f"no exit_heads.json in {folder}: train heads with `bildexp train ... train.exit_heads=[...]`")
        heads = cls(model, json.loads((folder / "exit_heads.json").read_text())["layers"])
        heads.load_state_dict(load_file(str(folder / "exit_heads.safetensors"), device=str(next(model.parameters()).device)))
        return heads.to(next(model.parameters()).dtype).eval()


class LayerwiseDecoder:
    """One example's decoder, run a slice of layers at a time over a per-layer KV cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        encoder_input_ids: torch.Tensor | None = None,
        heads: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ):
        # heads: optional trained exit heads, keyed by the 1-based layer they read (PPD's per-layer heads).
        self.model = model
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)
        self.heads = dict(heads or {})
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.lengths = [0] * self.n_layers  # tokens cached per layer
        # (start, k) → (position bias / rotary, the CUDA stream it was made on or None)
        self._position_memo: dict[tuple[int, int], tuple] = {}
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            if self.is_encoder_decoder:
                if encoder_input_ids is None:
                    raise ValueError("an encoder-decoder model needs encoder_input_ids")
                with PROMPT_CLOCK.measure(self.device):
                    self.encoder_hidden = model.get_encoder()(input_ids=encoder_input_ids).last_hidden_state
                self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                self.self_cache = self.cache.self_attention_cache
            else:
                self.encoder_hidden = None
                self.cache = DynamicCache()
                self.self_cache = self.cache

    # ------------------------------------------------------------------------------------ running
    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [1, k] → [1, k, D]
        return self.model.get_input_embeddings()(tokens)

    @torch.inference_mode()
    def run(self, h: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Layers lo..hi-1 over h [1, k, D], the k positions after what those layers have cached."""
        if lo >= hi:
            return h
        start = self._common_length(lo, hi)
        prompt = start == 0 and not self.is_encoder_decoder  # these layers' pass over a decoder-only prompt
        with PROMPT_CLOCK.measure(self.device) if prompt else contextlib.nullcontext():
            h = self._layers(h, start, lo, hi, self.cache, self.encoder_hidden)
        for i in range(lo, hi):
            self.lengths[i] = start + h.shape[1]
        return h

    @torch.inference_mode()
    def branch(self, tokens: torch.Tensor, hi: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """k alternative next tokens [k] through layers 0..hi-1, each against the cached past, as one batch
        of k, WITHOUT changing the cache (PPD's candidates) → (hidden states after layer hi [k, 1, D], the
        K/V [k, H, 1, dh] each layer would cache for them), for `adopt`."""
        k, start = tokens.shape[0], self._common_length(0, hi)
        own, cross = DynamicCache(), DynamicCache()
        for i in range(hi):  # the past, repeated for each candidate (a copy: the cache grows by one token)
            layer = self.self_cache.layers[i]
            own.update(layer.keys.expand(k, -1, -1, -1), layer.values.expand(k, -1, -1, -1), i)
            if self.is_encoder_decoder:
                done = self.cache.cross_attention_cache.layers[i]
                cross.update(done.keys.expand(k, -1, -1, -1), done.values.expand(k, -1, -1, -1), i)
        cache = EncoderDecoderCache(own, cross) if self.is_encoder_decoder else own
        encoder = self.encoder_hidden.expand(k, -1, -1) if self.is_encoder_decoder else None
        h = self._layers(self.embed(tokens.view(k, 1)), start, 0, hi, cache, encoder)
        return h, [(own.layers[i].keys[:, :, -1:], own.layers[i].values[:, :, -1:]) for i in range(hi)]

    def adopt(self, kv: list[tuple[torch.Tensor, torch.Tensor]], j: int) -> None:
        """Append candidate j's K/V from `branch` to layers 0..len(kv)-1, as if it had been run there."""
        for i, (key, value) in enumerate(kv):
            self.self_cache.update(key[j : j + 1], value[j : j + 1], i)
            self.lengths[i] += 1

    def _common_length(self, lo: int, hi: int) -> int:
        start = self.lengths[lo]
        if any(self.lengths[i] != start for i in range(lo, hi)):
            raise RuntimeError(f"layers {lo}..{hi - 1} hold different lengths {self.lengths[lo:hi]}")
        return start

    def _layers(self, h: torch.Tensor, start: int, lo: int, hi: int, cache, encoder_hidden) -> torch.Tensor:
        # h [B, k, D] at positions start..start+k-1 → after layers lo..hi-1 (B > 1 only with k = 1: branch)
        k = h.shape[1]
        mask = self._causal_mask(start, k)
        if self.is_encoder_decoder:
            bias = self._positions(start, k, h)  # [1, H, k, start+k]
            for layer in self.layers[lo:hi]:
                h = layer(h, attention_mask=mask, position_bias=bias, encoder_hidden_states=encoder_hidden,
                          cache=cache)[0]
        else:
            positions = torch.arange(start, start + k, device=h.device).unsqueeze(0)  # [1, k]
            rope = self._positions(start, k, h)
            for layer in self.layers[lo:hi]:
                h = layer(h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                          position_embeddings=rope)
        return h

    def _positions(self, start: int, k: int, h: torch.Tensor):
        """T5's relative position bias [1, H, k, start+k], or Llama's rotary (cos, sin), for positions
        start..start+k-1. Kept for the step, since early-exit methods run one token's layers in several
        slices (CALM: one per layer) and T5's bias costs ~0.1 ms, a tenth of a t5_multi30k decoder layer."""
        # PPD's branch thread shares this memo and may clear it at any moment: one atomic get, never a membership
        # check followed by a read, and the value returned is the one this call holds.
        key = (start, k)
        stream = torch.cuda.current_stream(h.device) if h.is_cuda else None  # this thread's stream (PPD's branch has its own)
        entry = self._position_memo.get(key)
        if entry is None:
            if self.is_encoder_decoder:
                attn = self.layers[0].layer[0].SelfAttention  # holds the relative position bias of all layers
                value = attn.compute_bias(k, start + k, device=h.device, past_seen_tokens=start)
            else:
                value = self.model.model.rotary_emb(h, position_ids=torch.arange(start, start + k, device=h.device).unsqueeze(0))
            if len(self._position_memo) > 4:  # only this step's (and PPD's next-position branch's) are needed
                self._position_memo.clear()
            self._position_memo[key] = (value, stream)
            return value
        value, made_on = entry
        if stream is not None and made_on is not None and made_on != stream:
            # Made on the other stream: the allocator must not hand its memory back (a cleared memo drops the last
            # reference) while kernels queued on this stream still read it.
            for t in (value if isinstance(value, tuple) else (value,)):
                t.record_stream(stream)
        return value

    @torch.inference_mode()
    def head(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """h [..., D] read after `layer` (1-based; None = the last) → logits [..., V]."""
        if layer is not None and layer in self.heads:
            return self.heads[layer](h)
        return exit_head(self.model, h)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """All layers over tokens [1, k] → logits [k, V]: what the model's own forward returns."""
        return self.head(self.run(self.embed(tokens), 0, self.n_layers))[0]

    @torch.inference_mode()
    def propagate(self, h: torch.Tensor, lo: int, hi: int) -> None:
        """State propagation (CALM): fill the K/V of layers lo..hi-1 at the next positions from h [1, k, D]."""
        k = h.shape[1]
        for i in range(lo, hi):
            start, layer = self.lengths[i], self.layers[i]
            if self.is_encoder_decoder:
                attn = layer.layer[0].SelfAttention
                x = layer.layer[0].layer_norm(h)
                shape = (1, k, -1, attn.key_value_proj_dim)
                key, value = attn.k(x).view(shape).transpose(1, 2), attn.v(x).view(shape).transpose(1, 2)
            else:
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                shape = (1, k, -1, attn.head_dim)
                key, value = attn.k_proj(x).view(shape).transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)
                positions = torch.arange(start, start + k, device=h.device).unsqueeze(0)
                cos, sin = self.model.model.rotary_emb(h, position_ids=positions)
                # The model's own rotary function, from the module that defines its attention class.
                rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
                key, _ = rotate(key, key, cos, sin)
            self.self_cache.update(key, value, i)
            self.lengths[i] = start + k

    def crop(self, n: int, lo: int = 0, hi: int | None = None) -> None:
        """Keep only the first n cached tokens of layers lo..hi-1 (self-attention; cross-attention stays)."""
        for i in range(lo, self.n_layers if hi is None else hi):
            drop = self.lengths[i] - n
            if drop > 0:
                self.self_cache.layers[i].crop(-drop)  # negative form: portable across transformers 5.x
                self.lengths[i] = n

    def _causal_mask(self, start: int, k: int) -> torch.Tensor | None:
        """Additive mask [1, 1, k, start+k]: position start+j sees cached tokens and new tokens up to itself."""
        if k == 1:
            return None  # one new token sees everything cached
        allowed = torch.ones(k, start + k, dtype=torch.bool, device=self.device).tril(diagonal=start)
        mask = torch.zeros(k, start + k, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]


class SharedLayers:
    """BiLD's early-exit variant (paper Section 4.4): the small model is the first n decoder layers of the
    large model with its final norm and shared head, over ONE cache.

    `small` and `large` behave like two `cache.ModelState`s (advance / rollback / length), so BiLD and
    speculative decoding run on them unchanged. The small model's passes fill the first n layers' KV; the
    large model's pass then runs only layers n.. over the hidden states the small passes left behind
    (and the first n layers over tokens the small model has not seen), so every layer's KV holds real
    values and no layer runs twice for a token.
    """

    def __init__(self, model: PreTrainedModel, n: int, encoder_input_ids: torch.Tensor | None = None):
        self.dec = LayerwiseDecoder(model, encoder_input_ids)
        self.n = n  # 1 <= n < n_layers, checked when the pair is loaded
        # Hidden states after layer n of the positions the first layers have seen and the rest have not.
        width = model.get_input_embeddings().embedding_dim
        self.pending = torch.empty(1, 0, width, dtype=self.dec.dtype, device=self.dec.device)  # [1, shallow - deep, D]
        self.small, self.large = _View(self, deep=False), _View(self, deep=True)

    @property
    def shallow(self) -> int:
        return self.dec.lengths[0]

    @property
    def deep(self) -> int:
        return self.dec.lengths[self.n]

    @torch.inference_mode()
    def run_shallow(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [1, k] after `shallow` → hidden states after layer n [1, k, D], also kept as pending
        h = self.dec.run(self.dec.embed(tokens), 0, self.n)
        self.pending = torch.cat([self.pending, h], dim=1)
        return h

    @torch.inference_mode()
    def advance_small(self, tokens: torch.Tensor, keep: int) -> torch.Tensor:
        return self.dec.head(self.run_shallow(tokens)[:, -keep:], layer=self.n)[0]  # [keep, V]

    @torch.inference_mode()
    def advance_large(self, tokens: torch.Tensor, keep: int) -> torch.Tensor:
        k = tokens.shape[1]  # positions deep .. deep + k - 1
        seen = self.shallow - self.deep  # of them, the first `seen` already went through the first n layers
        if k > seen:
            self.run_shallow(tokens[:, seen:])
        h, self.pending = self.pending[:, :k], self.pending[:, k:]
        h = self.dec.run(h, self.n, self.dec.n_layers)
        return self.dec.head(h[:, -keep:])[0]  # [keep, V]

    def rollback(self, m: int, deep: bool) -> None:
        if deep or m < self.deep:  # a rejected token is gone for both models
            self.dec.crop(m)
        else:
            self.dec.crop(m, 0, self.n)
        self.pending = self.pending[:, : max(0, self.shallow - self.deep)]


class _View:
    """One side of `SharedLayers`, with the `cache.ModelState` interface."""

    def __init__(self, shared: SharedLayers, deep: bool):
        self.shared, self.deep = shared, deep

    @property
    def length(self) -> int:
        return self.shared.deep if self.deep else self.shared.shallow

    def advance(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        if not 1 <= keep <= tokens.shape[1]:
            raise ValueError(f"keep={keep} must be in [1, {tokens.shape[1]}]")
        return (self.shared.advance_large if self.deep else self.shared.advance_small)(tokens, keep)

    def rollback(self, n: int) -> None:
        if n > self.length:
            raise ValueError(f"cannot roll back to {n}: only {self.length} tokens are cached")
        self.shared.rollback(n, self.deep)


def first_layers(model: PreTrainedModel, n: int, share: bool = False) -> PreTrainedModel:
    """A copy of model keeping only its first n decoder layers (same embeddings, final norm and head).

    Llama-family and GPT-2-style decoders and T5/MT5 decoders; the starting point of a cheap draft.
    share=True: the copy's parameters and buffers are the model's own tensors (no memory, for evaluating an
    exit of a large model); training such a copy would train the model.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())} if share else None
    draft = copy.deepcopy(model, memo)
    if draft.config.is_encoder_decoder:
        layers, key = draft.decoder.block, "num_decoder_layers"
    elif hasattr(draft, "model") and hasattr(draft.model, "layers"):
        layers, key = draft.model.layers, "num_hidden_layers"
    elif hasattr(draft, "transformer") and hasattr(draft.transformer, "h"):
        layers, key = draft.transformer.h, "n_layer"
    else:
        raise BildexpError(f"cannot slice the layers of a {type(model).__name__}: use a Llama-, GPT-2- or T5-style model")
    if not 1 <= n <= len(layers):
        raise BildexpError(f"cannot keep {n} of {len(layers)} decoder layers")
    del layers[n:]
    setattr(draft.config, key, n)
    return draft
