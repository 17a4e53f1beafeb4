"""Per-model decoding state: the only module that touches KV caches.

A `ModelState` holds, for one model and one example, the encoder output (computed once) and the
self-attention KV cache of the decoder, and offers two operations that every policy is built from:

    advance(tokens, keep)  feed new tokens after the cached ones, return logits of the last `keep`
    rollback(n)            forget every cached token at index >= n

It serves encoder-decoder models (T5, MT5, BART-like: `EncoderDecoderCache`, whose cross-attention part
is kept on rollback) and decoder-only models (Llama, GPT-2, Qwen-like: `DynamicCache`) alike. Token
index 0 is the first decoder token: the decoder start token for encoder-decoder models, the first
prompt token for decoder-only ones.
"""

from __future__ import annotations

import inspect
from collections import Counter

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class ModelState:
    """Encoder output + KV cache of one model for one example."""

    def __init__(self, model: PreTrainedModel, encoder_input_ids: torch.Tensor | None = None,
                 meter: Counter | None = None, role: str = "large"):
        # encoder_input_ids: [1, S] for encoder-decoder models, None for decoder-only ones.
        # meter: counters to add the work of every forward pass to, as <role>_pass*, <role>_encoder_* (bildexp/cost.py;
        # apart from the policies' own counters such as BiLD's small_tokens).
        self.model = model
        self.meter = meter
        self.role = role
        self.source_len = 0 if encoder_input_ids is None else int(encoder_input_ids.shape[1])
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.length = 0  # tokens held in the self-attention cache
        self._slice_logits = not _accepts_logits_to_keep(model)
        if self.is_encoder_decoder:
            if encoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs encoder_input_ids")
            self.encoder_outputs = model.get_encoder()(input_ids=encoder_input_ids)
            self._count("encoder_runs", 1)
            self._count("encoder_tokens", self.source_len)
            self._count("encoder_attention", self.source_len**2)
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            self.encoder_outputs = None
            self.cache = DynamicCache()

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Append tokens [1, k] to the cache; return the logits [keep, V] of the last `keep` positions.

        logits[j] is the distribution of the token that follows tokens[0, k - keep + j].
        """
        k = tokens.shape[1]
        if not 1 <= keep <= k:
            raise ValueError(f"keep={keep} must be in [1, {k}]")
        if self.is_encoder_decoder:
            out = self.model(
                encoder_outputs=self.encoder_outputs,
                decoder_input_ids=tokens,
                past_key_values=self.cache,
                use_cache=True,
            )
        else:
            out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache = out.past_key_values
        if self.meter is not None:
            self._count_forward(k)
        self.length += k
        logits = out.logits[0]  # [k or keep, V]
        if self._slice_logits:
            logits = logits[-keep:]
        return logits

    def _count(self, key: str, value: int) -> None:
        if self.meter is not None:
            self.meter[f"{self.role}_{key}"] += value

    def _count_forward(self, k: int) -> None:
        """The work of one forward pass of k tokens after `length` cached ones, in the units cost.py prices."""
        c, s = self.length, self.source_len
        self._count("passes", 1)
        self._count("pass_tokens", k)
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
            # crop(-k) removes the last k tokens; a positive argument means different things across
            # transformers 5.x releases (ENVIRONMENT.md), so only the negative form is used.
            self.cache.crop(-drop)
            self.length = n
