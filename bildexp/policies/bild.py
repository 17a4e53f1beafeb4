"""Big Little Decoder (Kim et al., NeurIPS 2023, Algorithm 1) with the official code's conventions.

Phases of one step:
  small step   the small model proposes the next token from its distribution pS;
  fallback     if max pS <= fallback_threshold (or max_small_steps small tokens are pending), the
               proposal is dropped and the large model runs once over every token past its cache;
  verify       that pass yields pL at each pending small token; the distance is the cross-entropy
               -log pL(y_small) (hard small label vs soft large label, the paper's choice);
  rollback     at the first pending token whose distance exceeds rollback_threshold, both caches are
               cut back there and the large model's token replaces it; otherwise the large model's
               next token is appended.

Conventions (see REFERENCE.md), and where we deviate:
- As in the official code, decoding starts with one large-model step, and the small model hands
  control back after `max_small_steps` consecutive tokens.
- The small token is kept iff max pS > fallback_threshold (Algorithm 1, line 4), so a threshold of
  1.0 always falls back and reproduces the large model exactly.
- Greedy mode skips flagged positions where the large model's argmax IS the small token (replacing a
  token by itself changes nothing), and rolls back at the first flagged position that differs. The
  official code instead stops scanning at the first flagged position; with our rule
  rollback_threshold=0 reproduces the large model's greedy output exactly.
- When the small model ends the sequence (eos or max_new_tokens) the large model verifies the pending
  tokens once more, so that no small token escapes the rollback check.
"""

from __future__ import annotations

import torch

from bildexp.policies.base import LARGE, SMALL, Policy, Prompt, Sequence, model_states


class BiLD(Policy):
    name = "bild"

    def begin(self, pair, prompt: Prompt) -> None:
        self.large, self.small = model_states(pair, prompt, self.counters)
        self.pending = 0  # trailing small tokens the large model has not verified yet

    def max_pass_tokens(self) -> int:
        return self.cfg.max_small_steps + 1  # every pending small token + the one before them

    def done(self, seq: Sequence) -> bool:
        return seq.finished and self.pending == 0

    def step(self, seq: Sequence) -> None:
        if seq.finished:  # the small model ended the sequence: verify before accepting the end
            self.large_step(seq, finishing=True)
        elif self.large.length == 0 or self.pending >= self.cfg.max_small_steps:
            self.large_step(seq, finishing=False)
        else:
            self.small_step(seq)

    def small_step(self, seq: Sequence) -> None:
        logits = self.small.advance(seq.span(self.small.length))[-1]  # [V]
        self.counters["small_steps"] += 1
        probs = self.probs(logits)
        if self.cfg.sampling:
            confidence, token = float(probs.max()), None
        else:  # the confidence and the greedy token in one read from the device
            confidence, token = torch.stack([probs.max().double(), logits.argmax().double()]).tolist()
        if confidence > self.cfg.fallback_threshold:
            seq.append(self.choose(logits, probs) if token is None else int(token), SMALL)
            self.pending += 1
            self.counters["small_tokens"] += 1
        else:
            self.counters["fallbacks"] += 1
            self.large_step(seq, finishing=False)

    def large_step(self, seq: Sequence, finishing: bool) -> None:
        """One non-autoregressive large pass: verify the pending small tokens, then add one token.

        finishing: the sequence already ended; only verify (the last token needs no successor).
        """
        n, u = len(seq), self.pending
        end = n - 1 if finishing else n
        keep = u if finishing else u + 1
        logits = self.large.advance(seq.span(self.large.length, end), keep)  # [keep, V]
        self.counters["large_calls"] += 1
        self.pending = 0
        j, token = self.verdict(logits, seq.span(n - u), u)
        if j is not None:
            m = n - u + j  # index of the rejected token in seq
            self.counters["rollbacks"] += 1
            self.counters["tokens_rolled_back"] += n - m
            seq.truncate(m)
            self.large.rollback(m)
            self.small.rollback(min(self.small.length, m))
            seq.append(self.choose(logits[j]) if token is None else token, LARGE)
        elif not finishing:
            seq.append(self.choose(logits[-1]) if token is None else token, LARGE)

    def verdict(self, logits: torch.Tensor, small_tokens: torch.Tensor, u: int) -> tuple[int | None, int | None]:
        """logits [keep, V] of the large model, the first u at the u pending small tokens [1, u] → (the first index to
        roll back, or None; greedy: the large model's token there, or at the last row when none is, else None).
        Greedy reads the device once: the rejection flags and the argmaxes together."""
        if self.cfg.sampling:
            hits = torch.nonzero(self.rejected(logits[:u], small_tokens)) if u else []
            return (int(hits[0, 0]) if len(hits) else None), None
        greedy = logits.argmax(-1)  # [keep]
        read = (torch.cat([self.rejected(logits[:u], small_tokens).long(), greedy]) if u else greedy).tolist()  # [u + keep]
        flagged, greedy = read[:u], read[u:]
        j = flagged.index(1) if 1 in flagged else None
        return j, greedy[-1 if j is None else j]

    def rejected(self, logits: torch.Tensor, small_tokens: torch.Tensor) -> torch.Tensor:
        """logits [u, V] of the large model at the u pending small tokens [1, u] → which to roll back [u] (bool)."""
        logp = torch.log_softmax(logits.float() / self.cfg.temperature, dim=-1)
        labels = small_tokens[0].unsqueeze(-1)  # [u, 1]
        distance = -logp.gather(-1, labels).squeeze(-1)  # [u] cross-entropy of each small token
        rejected = distance > self.cfg.rollback_threshold
        if not self.cfg.sampling:
            rejected &= logp.argmax(-1) != small_tokens[0]
        return rejected
