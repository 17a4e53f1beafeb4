"""BiLD Figure 2's motivating experiment (Section 3.1): the large model as an oracle at every step.

Both models decode the same sequence one token at a time. The small model proposes its token; the large
model, run on the same prefix, gives that token a likelihood pL(y_small); when pL(y_small) is below
`replace_threshold` the large model's own token replaces it (a replacement by the same token is not
counted). Raising the threshold raises the share of tokens the large model provides (the runner's
large_token_share, Figure 2's x-axis): 0 keeps every small token (vanilla small); 1 replaces every
token where the two models disagree (greedy: the large model's greedy output).

An upper bound on what fallback and rollback can recover, not a fast policy: both models run every step.
"""

from __future__ import annotations

from bildexp.policies.base import LARGE, SMALL, Policy, Prompt, Sequence, model_states


class Oracle(Policy):
    name = "oracle"

    def begin(self, pair, prompt: Prompt) -> None:
        self.large, self.small = model_states(pair, prompt, self.counters)

    def step(self, seq: Sequence) -> None:
        small_logits = self.small.advance(seq.span(self.small.length))[-1]  # [V]
        large_logits = self.large.advance(seq.span(self.large.length))[-1]  # [V]
        self.counters["small_steps"] += 1
        self.counters["large_calls"] += 1
        token = self.choose(small_logits)
        if float(self.probs(large_logits)[token]) < self.cfg.replace_threshold:
            large_token = self.choose(large_logits)
            if large_token != token:
                self.counters["replacements"] += 1
                seq.append(large_token, LARGE)
                return
        seq.append(token, SMALL)
