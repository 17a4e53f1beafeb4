"""Per-model decoding state: the only module that touches KV caches.

A `ModelState` holds, for one model and one example, the encoder output (computed once) and the
self-attention KV cache of the decoder, and offers two operations that every policy is built from:

    advance(tokens, keep)  feed new tokens after the cached ones, return logits of the last `keep`
    rollback(n)            forget every cached token at index >= n

It serves encoder-decoder models (T5, MT5, BART-like: `EncoderDecoderCache`, whose cross-attention part
is kept on rollback) and decoder-only models (Llama, GPT-2, Qwen-like) alike. Token index 0 is the first
decoder token: the decoder start token for encoder-decoder models, the first prompt token for decoder-only
ones.

Two backends behind the same two operations (`pair.cache`):
- dynamic: transformers' `DynamicCache`, grown by concatenation and cropped on rollback; eager PyTorch.
- static (`StaticDecoder`, gpt-fast's recipe): one model's K/V buffers preallocated once for the longest
  example of a run and reused by every example; a write position of our own (`PositionedLayer`) says where
  the next tokens go, so a rollback only moves it (entries past it are masked by position and overwritten
  later); the encoder runs once per example at the source's own length and every decoder layer's
  cross-attention K/V are written then into fixed-size buffers (positions past the source masked). With
  `pair.compile` the decoder
  forward is `torch.compile`d (fullgraph; CUDA graphs under mode="reduce-overhead" on GPU); every pass is
  padded to a power-of-two bucket (1, 2, 4, 8, 16 tokens), so a whole sweep runs on a handful of graphs,
  all compiled by `StaticDecoder.warmup` before anything is timed. Padding sits after the real tokens,
  so causal masking keeps it out of every kept logit. `pair.freeze` compiles with inductor freezing (the
  weights become graph constants, prepacked for the CPU's GEMM kernels).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import time
import types
from collections import Counter
from dataclasses import dataclass

import torch
import torch._inductor.config
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_outputs import BaseModelOutput

from bildexp import BildexpError
from bildexp.config import COMPILE_MODES
from bildexp.timing import PROMPT_CLOCK

# The first transformers release whose model forwards take a cache as `cache=` (every KV-cache call below).
TRANSFORMERS_CACHE_KEYWORD = "5.24"

# Model types whose transformers forward runs on a static cache (positions and masks read from the cache).
STATIC_MODEL_TYPES = ("t5", "mt5", "llama", "qwen2")
# Passes of more tokens than the largest bucket (a decoder-only prompt) run uncompiled at their exact length.
MAX_BUCKET = 16
_DECODER_ROUND, _SOURCE_ROUND = 64, 16  # capacities round up, so runs of one task share their graphs


def uses_cudagraphs(compile_mode: str, device: torch.device) -> bool:
    """Whether torch.compile's `compile_mode` records CUDA graphs on `device`: read from torch's own options of each
    mode (reduce-overhead and max-autotune do; max-autotune-no-cudagraphs and default do not), not from a list of names."""
    if device.type != "cuda" or compile_mode == "none":
        return False
    return bool(torch._inductor.list_mode_options(compile_mode).get("triton.cudagraphs", False))


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def bucket(k: int) -> int:
    """The padded length of a k-token pass: the next power of two (k itself above MAX_BUCKET)."""
    return k if k > MAX_BUCKET else 1 << (k - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class ModelState:
    """Encoder output + KV cache of one model for one example."""

    def __init__(self, model: PreTrainedModel, encoder_input_ids: torch.Tensor | None = None,
                 meter: Counter | None = None, role: str = "large", static: StaticDecoder | None = None):
        # encoder_input_ids: [1, S] for encoder-decoder models, None for decoder-only ones.
        # meter: counters to add the work of every forward pass to, as <role>_pass*, <role>_encoder_* (bildexp/cost.py;
        # apart from the policies' own counters such as BiLD's small_tokens).
        # static: the model's StaticDecoder (pair.cache=static); None: a DynamicCache of this state's own.
        self.model = model
        self.meter = meter
        self.role = role
        self.static = static
        self.source_len = 0 if encoder_input_ids is None else int(encoder_input_ids.shape[1])
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.length = 0  # tokens held in the self-attention cache
        self._slice_logits = not _accepts_logits_to_keep(model)
        if self.is_encoder_decoder and encoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs encoder_input_ids")
        self.device = model.device
        if static is not None:
            with PROMPT_CLOCK.measure(self.device) if self.is_encoder_decoder else contextlib.nullcontext():
                self._session = static.start(encoder_input_ids)
        elif self.is_encoder_decoder:
            with PROMPT_CLOCK.measure(self.device), torch.inference_mode():
                self.encoder_outputs = model.get_encoder()(input_ids=encoder_input_ids)
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            self.cache = DynamicCache()
        if self.is_encoder_decoder:
            self._count("encoder_runs", 1)
            self._count("encoder_tokens", self.source_len)
            self._count("encoder_attention", self.source_len**2)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Append tokens [1, k] to the cache; return the logits [keep, V] of the last `keep` positions.

        logits[j] is the distribution of the token that follows tokens[0, k - keep + j].
        """
        k = tokens.shape[1]
        if not 1 <= keep <= k:
            raise ValueError(f"keep={keep} must be in [1, {k}]")
        prompt = self.length == 0 and not self.is_encoder_decoder  # a decoder-only model's pass over the prompt
        with PROMPT_CLOCK.measure(self.device) if prompt else contextlib.nullcontext():
            if self.static is not None:
                logits = self.static.forward(tokens, self.length, keep, self._session)  # [keep, V]
            elif self.is_encoder_decoder:
                out = self.model(encoder_outputs=self.encoder_outputs, decoder_input_ids=tokens, cache=self.cache, use_cache=True)
                logits = out.logits[0, -keep:]
            else:
                out = self.model(input_ids=tokens, cache=self.cache, use_cache=True, logits_to_keep=keep)
                logits = out.logits[0]  # [k or keep, V]
                if self._slice_logits:
                    logits = logits[-keep:]
        check_finite(logits, self.model, self.length + k - keep)
        if self.meter is not None:
            self._count_forward(k, keep)
        self.length += k
        return logits

    def _count(self, key: str, value: int) -> None:
        if self.meter is not None:
            self.meter[f"{self.role}_{key}"] += value

    def _count_forward(self, k: int, head: int) -> None:
        """The work of one forward pass of k tokens after `length` cached ones, in the units cost.py prices; `head`:
        the positions whose logits the policy reads (the LM head's work: a decoder-only model computes only those,
        `logits_to_keep`; paths that compute the head on every position and drop the rest are not charged for it,
        so every backend meters the same work)."""
        c, s = self.length, self.source_len
        self._count("passes", 1)
        self._count("pass_tokens", k)
        self._count("pass_head_tokens", head)
        self._count("pass_context", c)  # cached tokens whose keys and values are read
        self._count("pass_attention", k * c + k * (k + 1) // 2)  # causal query-key pairs
        if self.is_encoder_decoder:
            self._count("pass_cross_context", s)  # encoder positions whose cross-attention K/V are read
            self._count("pass_cross_attention", k * s)

    def rollback(self, n: int) -> None:
        """Keep only the first n cached tokens (self-attention only; cross-attention stays)."""
        drop = self.length - n
        if drop < 0:
            raise ValueError(f"cannot roll back to {n}: only {self.length} tokens are cached")
        if drop > 0:
            if self.static is None:
                # crop(-k) removes the last k tokens; a positive argument means different things across
                # transformers 5.x releases (ENVIRONMENT.md), so only the negative form is used.
                self.cache.crop(-drop)
            # On the static cache the next pass simply writes at n: entries past it are masked by position.
            self.length = n


@torch.inference_mode()
def check_cache_keyword(model: PreTrainedModel) -> None:
    """Run once per loaded model: a 2-token forward with a fresh cache passed as `cache=` must leave 2 tokens in it.
    transformers 5.17-5.23 accept the keyword through **kwargs and drop it, so every step would decode without context:
    plausible timings, garbage tokens, no error. Such a release stops the run in one line."""
    import transformers

    ids = torch.tensor([[1, 2]], device=model.device)
    if model.config.is_encoder_decoder:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model(input_ids=ids, decoder_input_ids=ids, cache=cache, use_cache=True)
    else:
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True)
    if cache.get_seq_length() != 2:
        raise BildexpError(f"transformers {transformers.__version__} ignores the KV cache passed to a model as `cache=` "
                           f"(bildexp needs >= {TRANSFORMERS_CACHE_KEYWORD}): pip install 'transformers>={TRANSFORMERS_CACHE_KEYWORD},<6'")


def check_finite(logits: torch.Tensor, model: PreTrainedModel, position: int) -> None:
    """logits [keep, V] of the positions from `position` on: inf or NaN stops the run in one line (fp16 T5/mT5
    overflow; NaN probabilities would make BiLD fall back forever and argmax pick garbage)."""
    if not bool(torch.isfinite(logits).all()):
        hint = ("use pair.dtype=float32 or bfloat16 (T5 and mT5 overflow in float16)" if model.dtype == torch.float16
                else "check the model's weights (this dtype does not overflow in a sound model)")
        raise BildexpError(f"{model.name_or_path} produced non-finite logits (inf/NaN) in {model.dtype} at decoder position "
                           f"{position}: {hint}")


class PositionedLayer(StaticLayer):
    """A preallocated K/V layer written at a position its `StaticDecoder` owns (a 0-d tensor shared by all
    layers), not at transformers' own running `cumulative_length`: moving that position back is a rollback.

    transformers reads the past length from `get_seq_length` (positions, relative-position bias, causal mask)
    before each layer writes, so every layer of one pass sees the same position; the decoder moves it between
    passes."""

    def __init__(self, max_cache_len: int, position: torch.Tensor):
        super().__init__(max_cache_len)
        self.position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [1, H, k, d] → the whole buffers [1, H, max_cache_len, d]
        index = torch.arange(key_states.shape[-2], device=key_states.device) + self.position
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> torch.Tensor:
        return self.position

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a PositionedLayer is rolled back by its StaticDecoder's position, not cropped")


class CrossLayer(StaticLayer):
    """Cross-attention K/V of one decoder layer, [1, H, S_cap, d_kv]: written by `StaticDecoder.start` once per
    example (positions past the source are masked), read by every pass, which never updates them."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("cross-attention K/V are written by StaticDecoder.start")

    def get_seq_length(self) -> int:
        return self.max_cache_len


def _attention_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(decoder layers, K/V heads, head dim) of a model that StaticDecoder supports."""
    c = model.config
    if c.is_encoder_decoder:
        return c.num_decoder_layers, c.num_heads, c.d_kv
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


def _own_code(fn, tag):
    """A copy of fn with a code object of its own: dynamo keeps compiled graphs per code object, so a copy per
    model and pass shape holds exactly one graph, found without searching other models' graphs."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(tag))}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)


def _decoder_forward(model, tokens, cache, encoder_hidden, source_mask, last: int = 0):
    # tokens: [1, kb]; encoder_hidden: [1, S_cap, d] or None; source_mask: [1, S_cap] → logits [1, kb, V], or (last > 0,
    # decoder-only models) [1, last, V] of the last positions only: the LM head skips the others (logits_to_keep)
    if encoder_hidden is None:
        return model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=last).logits
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask=source_mask,
                 decoder_input_ids=tokens, cache=cache, use_cache=True).logits


def _encode(model, source_ids, source_mask=None):
    # source_ids: [1, S] (source_mask [1, S]: 0 at padding) → each decoder layer's cross-attention (K, V), [1, H, S,
    # d_kv] each: what T5's cross-attention would compute on its first pass (T5/MT5 module names), once per example.
    hidden = model.get_encoder()(input_ids=source_ids, attention_mask=source_mask).last_hidden_state
    kv = []
    for block in model.decoder.block:
        attn = block.layer[1].EncDecAttention
        shape = (1, -1, attn.n_heads, attn.key_value_proj_dim)
        kv.append((attn.k(hidden).view(shape).transpose(1, 2), attn.v(hidden).view(shape).transpose(1, 2)))
    return kv


@dataclass
class CompileStats:
    graphs: int = 0  # graphs compiled: one per pass shape, and the encoder's
    compile_s: float = 0.0  # wall time of their first calls
    late: int = 0  # of them, compiled after `warmup` (their example's latency includes a compile)


class StaticDecoder:
    """One model's preallocated KV cache and (optionally compiled) forward, reused by every example of a run.

    Serves one `ModelState` at a time: `start` begins an example (and invalidates the previous state)."""

    def __init__(self, model: PreTrainedModel, compile_mode: str = "none", freeze: bool = False):
        model_type = model.config.model_type
        if model_type not in STATIC_MODEL_TYPES:
            raise ValueError(f"pair.cache=static supports {', '.join(STATIC_MODEL_TYPES)} models, not {model_type!r}: "
                             "use pair.cache=dynamic")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}: one of {', '.join(COMPILE_MODES)}")
        self.model = model
        self.compile_mode = compile_mode
        self.freeze = freeze  # inductor freezing: the weights are constants of the graphs (prepacked on CPU)
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.device = model.device
        self.dtype = model.dtype
        self._cudagraphs = uses_cudagraphs(compile_mode, self.device)
        # The buffers the graphs read but never write (write position, cross-attention K/V, source mask) get fixed
        # addresses for CUDA graphs only: inductor's freezing folds every static-address input into the graph as a
        # constant, which would freeze them at their warm-up values. (Buffers a graph writes, the self-attention
        # K/V, stay graph inputs either way.)
        self._static_addresses = self._cudagraphs and not freeze
        self.position = self._graph_input(torch.zeros((), dtype=torch.long, device=self.device))
        self.decoder_capacity = 0
        self.source_capacity = 0
        self.stats = CompileStats()
        self.warm = False  # set by warmup: graphs first seen later count as late
        self._session = 0
        self._tokens: dict[int, torch.Tensor] = {}  # bucket → its input buffer [1, bucket]
        # Under CUDA graphs every input shape is a graph of its own, recorded on a later call than its compile: the
        # encoder runs on sources padded to a few lengths (source_bucket; masked: padding changes no real position's
        # output), each compiled and recorded by `warmup`, instead of a graph per source length met while timing.
        self.bucket_sources = self._cudagraphs
        self._sources: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # source bucket → (ids, mask) [1, bucket]
        self._graphs: dict[tuple, object] = {}  # ("encoder",) or a pass shape → its compiled function
        self.reserve(_DECODER_ROUND, _SOURCE_ROUND if self.is_encoder_decoder else 0)

    # -- capacity ------------------------------------------------------------------------------------------
    def reserve(self, decoder_len: int, source_len: int = 0) -> None:
        """Make room for decoder_len cached tokens (the longest prefix + max_new_tokens + the largest bucket)
        and sources of source_len tokens. Capacities only grow (rounded up); growing changes the graphs'
        shapes, so the runner reserves for the whole run before warming up."""
        decoder_len, source_len = _round_up(decoder_len, _DECODER_ROUND), _round_up(source_len, _SOURCE_ROUND)
        if decoder_len > self.decoder_capacity:
            self._allocate_decoder(decoder_len)
        if self.is_encoder_decoder and source_len > self.source_capacity:
            self._allocate_source(source_len)

    def _buffers(self, layer: StaticLayer) -> None:
        n_layers, heads, head_dim = _attention_shape(self.model)
        sample = torch.zeros(1, heads, 1, head_dim, dtype=self.dtype, device=self.device)
        layer.lazy_initialization(sample, sample)  # allocates [1, heads, max_cache_len, head_dim] (static address)

    def _allocate_decoder(self, capacity: int) -> None:
        n_layers = _attention_shape(self.model)[0]
        old = getattr(self, "self_cache", None)
        layers = [PositionedLayer(capacity, self.position) for _ in range(n_layers)]
        for i, layer in enumerate(layers):
            self._buffers(layer)
            if old is not None:  # growing mid-example keeps what is cached
                n = self.decoder_capacity
                layer.keys[:, :, :n].copy_(old.layers[i].keys)
                layer.values[:, :, :n].copy_(old.layers[i].values)
        self.self_cache = Cache(layers=layers)
        self.decoder_capacity = capacity
        self._assemble()

    def _allocate_source(self, capacity: int) -> None:
        n_layers = _attention_shape(self.model)[0]
        layers = [CrossLayer(capacity) for _ in range(n_layers)]
        for layer in layers:
            self._buffers(layer)  # transformers marks them static-address: replaced below unless CUDA graphs want that
            layer.keys, layer.values = self._graph_input(layer.keys.clone()), self._graph_input(layer.values.clone())
        self.cross_cache = Cache(layers=layers)
        d = self.model.config.d_model
        self.source_mask = self._graph_input(torch.zeros(1, capacity, dtype=torch.long, device=self.device))
        # transformers' T5 decoder takes the encoder output but, with the cross-attention K/V cached, reads only its
        # shape (for the mask): a zero buffer of the capacity's shape, never written.
        self.encoder_hidden = self._graph_input(torch.zeros(1, capacity, d, dtype=self.dtype, device=self.device))
        self.source_capacity = capacity
        self._assemble()

    def _graph_input(self, t: torch.Tensor) -> torch.Tensor:
        """A buffer the compiled graphs read and never write, static-address when CUDA graphs need it."""
        if self._static_addresses:
            torch._dynamo.mark_static_address(t)
        return t

    def _assemble(self) -> None:
        if not self.is_encoder_decoder:
            self.cache = self.self_cache
        elif hasattr(self, "self_cache") and hasattr(self, "cross_cache"):
            self.cache = EncoderDecoderCache(self.self_cache, self.cross_cache)
            self.cache.is_updated = {i: True for i in range(len(self.cross_cache.layers))}  # start() writes them

    # -- one example ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, encoder_input_ids: torch.Tensor | None) -> int:
        """Begin an example: position 0, and for an encoder-decoder model the encoder run at the source's length and
        every decoder layer's cross-attention K/V written into the buffers (positions past the source masked).
        → a session id."""
        self._session += 1
        self.position.fill_(0)
        if self.is_encoder_decoder:
            s = encoder_input_ids.shape[1]
            self.reserve(self.decoder_capacity, s)
            if self.bucket_sources:  # padded to its bucket, one fixed input pair per bucket
                sb = self.source_bucket(s)
                if sb not in self._sources:
                    self._sources[sb] = tuple(self._graph_input(torch.zeros(1, sb, dtype=torch.long, device=self.device))
                                              for _ in range(2))
                ids, mask = self._sources[sb]
                ids[:, :s].copy_(encoder_input_ids)
                mask.zero_()
                mask[:, :s] = 1
                args, key = (self.model, ids, mask), ("encoder", sb)
            else:  # an inference tensor, as in warmup: one kind of input for the graph guards
                args, key = (self.model, encoder_input_ids.clone()), ("encoder",)
            kv = _encode(*args) if self.compile_mode == "none" else self._call(key, *args)
            self.source_mask.zero_()
            self.source_mask[:, :s] = 1
            for layer, (k, v) in zip(self.cross_cache.layers, kv):
                layer.keys[:, :, :s].copy_(k[:, :, :s])
                layer.values[:, :, :s].copy_(v[:, :, :s])
        return self._session

    def source_bucket(self, s: int) -> int:
        """The padded length of an s-token source: the next power of two from 16, at most the source capacity."""
        return min(max(16, 1 << (s - 1).bit_length()), self.source_capacity)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, length: int, keep: int, session: int) -> torch.Tensor:
        """tokens [1, k] written at positions length.. (padded to a bucket) → logits [keep, V] of the last real ones."""
        if session != self._session:
            raise RuntimeError("this ModelState's StaticDecoder has started another example since")
        k = tokens.shape[1]
        kb = bucket(k)
        if length + kb > self.decoder_capacity:
            self.reserve(length + kb + _DECODER_ROUND)
        # One fixed input tensor per bucket (one kind of tensor for the graph guards, one address for CUDA graphs).
        # Its positions past k keep whatever ids they held: they come after the real tokens, so causal masking
        # keeps them out of every kept logit, and the next passes overwrite their K/V.
        padded = self._tokens.get(kb)
        if padded is None:
            padded = self._tokens[kb] = torch.zeros(1, kb, dtype=torch.long, device=self.device)
        padded[:, :k].copy_(tokens)
        tokens = padded
        self.position.fill_(length)
        hidden, mask = (self.encoder_hidden, self.source_mask) if self.is_encoder_decoder else (None, None)
        if self.compile_mode == "none" or kb > MAX_BUCKET:  # kb > MAX_BUCKET: a long prompt, once per example
            if self.is_encoder_decoder:
                return _decoder_forward(self.model, tokens, self.cache, hidden, mask)[0, k - keep : k]
            # The LM head on the kept positions and the padding after them only: a prompt pass would otherwise compute
            # [k, V] logits for one row (the head is 15 % of the Qwen2.5-1.5B's weights, 28 % of the 0.5B's).
            return _decoder_forward(self.model, tokens, self.cache, hidden, mask, kb - k + keep)[0, :keep]
        logits = self._call(("step", kb, self.decoder_capacity, self.source_capacity), self.model, tokens, self.cache, hidden, mask)
        kept = logits[0, k - keep : k]
        # CUDA graphs reuse their output buffer on the next replay (another model's call may come first): a copy of the
        # rows the policy reads, not of the whole [1, kb, V] output.
        return kept.clone() if self._cudagraphs else kept

    def _call(self, key: tuple, *args):
        """The compiled forward of one pass shape (key), compiled on its first call; ("encoder",) is the encoder."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        fn = self._graphs.get(key)
        if fn is not None:
            if key[0] == "encoder":
                return fn(*args)
            # Each shape has a function (a code object) of its own with exactly one compiled graph, whose inputs
            # are this decoder's fixed buffers: the key above already says which graph applies, so dynamo's
            # per-call guard checks (~0.4 ms on this CPU, as long as a small model's step) are skipped.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(*args)
        # Without CUDA graphs the encoder runs once per example at the source's own length (padding it would cost
        # compute): one graph with a symbolic length; with them, one static graph per source bucket. Decoder passes:
        # one static graph per bucket and capacity.
        dynamic = key == ("encoder",)
        fn = _own_code(_encode if key[0] == "encoder" else _decoder_forward, (id(self), *key))
        fn = self._graphs[key] = torch.compile(fn, fullgraph=True, dynamic=dynamic, mode=self.compile_mode)
        t0 = time.perf_counter()  # the first call compiles: timed and counted apart
        # max-autotune writes its kernel benchmark tables to stderr: kept out of the user's terminal (errors still raise)
        with torch._inductor.config.patch(freezing=self.freeze), contextlib.redirect_stderr(io.StringIO()):
            out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.graphs += 1
        self.stats.compile_s += time.perf_counter() - t0
        self.stats.late += int(self.warm)
        return out

    # -- before timing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self, max_pass_tokens: int) -> None:
        """Run every pass shape a run can need (the encoder, and each bucket up to max_pass_tokens' bucket), so that
        all compilation happens here and none while an example is timed."""
        sizes = sorted({bucket(k) for k in range(1, min(max_pass_tokens, MAX_BUCKET) + 1)})
        source = torch.zeros(1, 2, dtype=torch.long, device=self.device) if self.is_encoder_decoder else None
        # CUDA-graph trees run a new graph eagerly first and record it on a later call: three calls each, so that
        # recording happens here too, not in a timed example.
        calls = 3 if self._cudagraphs else 1
        for kb in sizes:
            for _ in range(calls):
                session = self.start(source)
                self.forward(torch.zeros(1, kb, dtype=torch.long, device=self.device), 0, 1, session)
        if self.is_encoder_decoder and self.bucket_sources:  # every source bucket up to the reserved capacity
            for sb in sorted({self.source_bucket(s) for s in range(1, self.source_capacity + 1)}):
                for _ in range(calls):
                    self.start(torch.zeros(1, sb, dtype=torch.long, device=self.device))
        self.start(source)
        self.warm = True
