"""Vanilla autoregressive decoding with one model of the pair (the baseline every speedup is against)."""

from __future__ import annotations

from bildexp.policies.base import LARGE, SMALL, Policy, Prompt, Sequence, model_state, model_states


class Vanilla(Policy):
    name = "vanilla"

    def begin(self, pair, prompt: Prompt) -> None:
        self.source = LARGE if self.cfg.which == "large" else SMALL
        if self.cfg.which == "small" and pair.small_layers is not None:
            self.state = model_states(pair, prompt)[1]  # an early-exit pair's first layers
        else:
            self.state = model_state(pair, self.cfg.which, prompt, self.counters)

    def step(self, seq: Sequence) -> None:
        logits = self.state.advance(seq.span(self.state.length))  # [1, V]
        self.counters[f"{self.cfg.which}_calls"] += 1
        seq.append(self.choose(logits[-1]), self.source)
