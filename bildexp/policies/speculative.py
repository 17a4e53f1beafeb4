"""Speculative decoding (Leviathan et al., ICML 2023; Chen et al., 2023): the baseline BiLD is compared with.

Phases of one step:
  draft    the small model proposes up to `num_draft_tokens` tokens autoregressively (fewer when a
           drafted token is an eos id or max_new_tokens is reached);
  verify   the large model runs once over every token past its cache, which yields its distribution
           at each drafted position plus one more (the bonus position);
  accept   greedy: the longest prefix where the draft equals the large argmax, then the large argmax
           at the first mismatch (or the bonus token). Sampling: draft token x is kept with probability
           min(1, q(x)/p(x)) (q large, p small, both after temperature and nucleus, `Policy.dist`);
           the first rejected one is replaced by a sample from normalize(max(q - p, 0)); a fully
           accepted window adds a bonus sample from q. The output is then distributed exactly as the
           large model's own samples;
  commit   both caches are cut back to the accepted length and the large model's token is appended
           (unless the accepted draft already ended the sequence).

Counters are named so that `derived_columns` gives vLLM's acceptance metrics (drafts, drafted_tokens,
accepted_tokens, drafted_at_i, accepted_at_i) and BiLD's Table-4 rates: every verification is a
fallback (a hand-over to the large model) and every rejected draft token is rolled back, so
fallback_rate = 1 / mean window and rollback_rate = 1 - acceptance_rate.
"""

from __future__ import annotations

from collections import Counter

import torch

from bildexp.policies.base import LARGE, SMALL, Policy, Prompt, Sequence, draw, model_states, nucleus, sample, sample_token, top_nucleus


class Speculative(Policy):
    name = "speculative"

    def begin(self, pair, prompt: Prompt) -> None:
        self.large, self.small = model_states(pair, prompt, self.counters)

    def max_pass_tokens(self) -> int:
        return self.cfg.num_draft_tokens + 1  # the drafted window + the token before it

    def step(self, seq: Sequence) -> None:
        start = len(seq)
        p = self.draft(seq)  # [k, V] small distributions (sampling) or None (greedy)
        k = len(seq) - start
        # Every token past the large cache in one pass; logits[j] follows seq[start + j - 1].
        logits = self.large.advance(seq.span(self.large.length), keep=k + 1)  # [k + 1, V]
        self.counters["large_calls"] += 1
        n, token = self.accept(seq.tokens[start:], p, logits)
        self.commit(seq, start + n, token)
        self.count(k, n)

    def draft(self, seq: Sequence) -> torch.Tensor | None:
        """Append up to num_draft_tokens small-model tokens to seq; return their distributions p [k, V]."""
        dists = []
        for _ in range(self.cfg.num_draft_tokens):
            logits = self.small.advance(seq.span(self.small.length))[-1]  # [V]
            self.counters["small_steps"] += 1
            if self.cfg.sampling:  # one softmax and one partial sort; p stays on the device
                probs = self.probs(logits)
                kept, tokens = top_nucleus(probs, self.cfg.top_p)
                seq.append(draw(kept, tokens, self.generator), SMALL)
                dists.append(kept if tokens is None else torch.zeros_like(probs).scatter(-1, tokens, kept))
            else:
                seq.append(int(logits.argmax()), SMALL)
            if seq.finished:  # eos drafted or max_new_tokens reached: nothing may follow
                break
        return torch.stack(dists) if dists else None

    def accept(self, drafted: list[int], p: torch.Tensor | None, logits: torch.Tensor) -> tuple[int, int]:
        """Drafted tokens (k), p [k, V], large logits [k + 1, V] → (accepted count n, the large model's token)."""
        if not self.cfg.sampling:
            target = logits.argmax(-1).tolist()  # [k + 1]
            n = next((j for j, (d, t) in enumerate(zip(drafted, target)) if d != t), len(drafted))
            return n, target[n]
        probs = self.probs(logits)  # [k + 1, V], one softmax
        for j, x in enumerate(drafted):
            q = nucleus(probs[j], self.cfg.top_p)
            # Accept iff r < q(x) / p(x), written without the division (p(x) > 0: x was drawn from p).
            r = torch.rand((), generator=self.generator, device=self.generator.device)
            if float(r * p[j, x]) >= float(q[x]):
                residual = (q - p[j]).clamp(min=0)  # [V]
                # An all-zero residual means q == p up to rounding, where a rejection is a rounding artefact.
                return j, sample(residual if residual.sum() > 0 else q, self.generator)
        return len(drafted), sample_token(probs[-1], self.cfg.top_p, self.generator)

    def commit(self, seq: Sequence, m: int, token: int) -> None:
        """Keep the first m tokens (prefix + accepted draft) in seq and both caches, then add the large token."""
        seq.truncate(m)
        self.large.rollback(m)
        self.small.rollback(min(self.small.length, m))
        if not seq.finished:
            seq.append(token, LARGE)

    @staticmethod
    def derived_columns(sums: Counter) -> dict[str, object]:
        """vLLM's definitions: acceptance rate = accepted / drafted tokens, mean acceptance length = 1 + accepted /
        drafts, and the acceptance rate at each draft position."""
        if not sums["drafts"]:
            return {}
        by_pos = [sums[f"accepted_at_{i}"] / sums[f"drafted_at_{i}"] for i in range(1, 100) if sums[f"drafted_at_{i}"]]
        return {
            "acceptance_rate": sums["accepted_tokens"] / max(sums["drafted_tokens"], 1),
            "mean_accepted_length": 1 + sums["accepted_tokens"] / sums["drafts"],
            "acceptance_by_position": " ".join(f"{a:.3f}" for a in by_pos),
        }

    def count(self, k: int, n: int) -> None:
        """k drafted, n accepted in this window (positions are 1-based, as the runner reads them)."""
        c = self.counters
        c["drafts"] += 1
        c["fallbacks"] += 1
        c["drafted_tokens"] += k
        c["small_tokens"] += k
        c["accepted_tokens"] += n
        c["tokens_rolled_back"] += k - n
        c["rollbacks"] += int(n < k)
        for i in range(1, k + 1):
            c[f"drafted_at_{i}"] += 1
        for i in range(1, n + 1):
            c[f"accepted_at_{i}"] += 1
