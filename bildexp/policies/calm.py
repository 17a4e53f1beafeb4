"""CALM: confident adaptive language modelling (Schuster et al., NeurIPS 2022), as the BiLD paper ran it.

Per generated token the decoder runs layer by layer (`layerwise.LayerwiseDecoder`); after each layer
but the last a confidence is measured, and the token exits at the first layer whose confidence exceeds
the decaying threshold

    lambda(t) = clip(0.9 * exit_threshold + 0.1 * exp(-exit_decay * t / max_new_tokens), 0, 1)

(t = tokens generated so far). The exited hidden state is copied into the skipped layers, which compute
their K/V from it (state propagation), so later tokens attend to something at every layer.

Confidence measures (`confidence_measure`):
  softmax_max    the top probability of the exit head's distribution;
  softmax_diff   top-1 minus top-2 probability;
  state          cosine similarity of the hidden states after this layer and the previous one
                 (saturation; the BiLD authors' choice, as it needs no LM-head pass per layer).
A confidence must be strictly greater than lambda, so exit_threshold=1 with exit_decay=0 never exits
and reproduces the model's greedy output. The first step (the prompt, or the decoder start token)
runs every layer. The pair's large model decodes; the small one is not used.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from bildexp.layerwise import LayerwiseDecoder
from bildexp.policies.base import LARGE, SMALL, Policy, Prompt, Sequence


class CALM(Policy):
    name = "calm"

    def begin(self, pair, prompt: Prompt) -> None:
        self.dec = LayerwiseDecoder(pair.large, prompt.encoder_input_ids)

    @staticmethod
    def derived_columns(sums: Counter) -> dict[str, object]:
        """The mean exit layer (counted from 1; an exit at the last layer is no early exit) and its histogram."""
        if not sums["exits_total"]:
            return {}
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in sums if k.startswith("exit_at_"))
        return {"mean_exit_layer": sums["exit_layer_sum"] / sums["exits_total"],
                "exit_layer_histogram": " ".join(f"{layer}:{sums[f'exit_at_{layer}']}" for layer in layers)}

    def threshold(self, seq: Sequence) -> float:
        t = len(seq) - seq.prefix_len
        decay = math.exp(-self.cfg.exit_decay * t / seq.max_new_tokens)
        return min(1.0, max(0.0, 0.9 * self.cfg.exit_threshold + 0.1 * decay))

    def confidence(self, h: torch.Tensor, prev: torch.Tensor, logits: torch.Tensor | None) -> float:
        """h, prev [D]: the last position after this layer and the one before; logits [V] when needed."""
        measure = self.cfg.confidence_measure
        if measure == "state":
            return float(torch.nn.functional.cosine_similarity(h.float(), prev.float(), dim=0))
        top = torch.topk(self.probs(logits), 2).values
        return float(top[0]) if measure == "softmax_max" else float(top[0] - top[1])

    def step(self, seq: Sequence) -> None:
        dec, n = self.dec, self.dec.n_layers
        first = dec.lengths[0] == 0
        h = dec.embed(seq.span(dec.lengths[0]))  # [1, k, D]
        lam = self.threshold(seq)
        for layer in range(1, n + 1):  # 1-based: the hidden state after `layer` layers
            prev, h = h, dec.run(h, layer - 1, layer)
            if layer == n or first:
                continue
            logits = dec.head(h[0, -1], layer) if self.cfg.confidence_measure != "state" else None
            if self.confidence(h[0, -1], prev[0, -1], logits) > lam:
                dec.propagate(h, layer, n)  # the skipped layers get this state copied in
                break
        else:
            layer, logits = n, None
        if logits is None:
            logits = dec.head(h[0, -1], None if layer == n else layer)  # [V]
        self.counters[f"exit_at_{layer}"] += 1
        self.counters["exit_layer_sum"] += layer
        self.counters["exits_total"] += 1
        seq.append(self.choose(logits), LARGE if layer == n else SMALL)
