"""PPD match rates (Yang et al., 2023, Table 1 and Tables 4-6) measured inside a harness run.

Decodes greedily with the large model, layer by layer (`layerwise.LayerwiseDecoder`; the output is the
model's greedy output), and at every step checks, for each layer l in `match_layers` and each k in
`match_top_k`, whether the top-k tokens of the exit head after layer l (final norm + shared LM head)
contain the token the last layer chooses: the event PPD's early prediction at d̄ = l needs. With
`match_heads` (a folder from `bildexp train ... train.exit_heads=[...]`) the trained per-layer heads read
the early predictions instead (the paper's "trained: Y").

Counters: match_steps (steps checked), match_l<l>_k<k> (hits), and the same per token-position bucket
(_p<b>: eight equal buckets over max_new_tokens, as the paper's Tables 4-6). `bildexp.ppd.table1` and
`position_tables` turn a CSV of such runs into the paper's tables.
"""

from __future__ import annotations

import math

import torch

from bildexp import BildexpError
from bildexp.layerwise import ExitHeads, LayerwiseDecoder
from bildexp.models import resolve_path
from bildexp.policies.base import LARGE, Policy, Prompt, Sequence

BUCKETS = 8


class PPDMatch(Policy):
    name = "ppd_match"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loaded: tuple | None = None  # (model, {layer: trained head}): heads load once per model

    def trained_heads(self, model) -> dict | None:
        if self.cfg.match_heads is None:
            return None
        if self.loaded is None or self.loaded[0] is not model:
            self.loaded = (model, dict(ExitHeads.load(resolve_path(self.cfg.match_heads), model).items()))
        return self.loaded[1]

    def begin(self, pair, prompt: Prompt) -> None:
        self.dec = LayerwiseDecoder(pair.large, prompt.encoder_input_ids, heads=self.trained_heads(pair.large))
        n = self.dec.n_layers
        self.layers = sorted(set(self.cfg.match_layers)) or list(range(1, n))
        if any(layer >= n for layer in self.layers):
            raise BildexpError(f"policy.match_layers={self.cfg.match_layers}: this decoder has {n} layers; use 1..{n - 1}")

    def step(self, seq: Sequence) -> None:
        dec = self.dec
        h = dec.embed(seq.span(dec.lengths[0]))  # [1, k, D]
        early: dict[int, torch.Tensor] = {}  # layer → top-max(k) token ids at the last position
        top = max(self.cfg.match_top_k)
        for layer in range(1, dec.n_layers + 1):
            h = dec.run(h, layer - 1, layer)
            if layer in self.layers:
                early[layer] = torch.topk(dec.head(h[0, -1], layer), top).indices
        logits = dec.head(h[0, -1])  # [V]
        token = self.choose(logits)
        t = len(seq) - seq.prefix_len
        bucket = min(t // math.ceil(seq.max_new_tokens / BUCKETS), BUCKETS - 1)
        if t == 0:  # d, once per example (the tables divide by n_examples): d̄ = d/2 is where Figures 2/4 read
            self.counters["decoder_layers"] += dec.n_layers
        self.counters["match_steps"] += 1
        self.counters[f"match_steps_p{bucket}"] += 1
        final = int(logits.argmax())
        for layer, ids in early.items():
            for k in self.cfg.match_top_k:
                if final in ids[:k].tolist():
                    self.counters[f"match_l{layer}_k{k}"] += 1
                    self.counters[f"match_l{layer}_k{k}_p{bucket}"] += 1
        seq.append(token, LARGE)
