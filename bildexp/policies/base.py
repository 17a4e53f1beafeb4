"""The one decode loop that every policy runs in, and the pieces policies share.

A policy turns a `Prompt` (token ids) into a `Generation` (token ids, per-token provenance, counters).
`Policy.decode` owns the loop; subclasses implement `begin` (create model states) and `step` (grow,
or roll back and regrow, the `Sequence`). Policies never time themselves, tokenize, read data or
write files: the runner does that around `decode`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from bildexp.config import PolicyConfig
from bildexp.models import ModelPair

LARGE, SMALL = "L", "S"


@dataclass
class Prompt:
    """What the decoder starts from, already tokenized."""

    # Decoder token ids at index 0..: [decoder_start] (encoder-decoder) or the prompt (decoder-only).
    decoder_prefix: list[int]
    # [1, S] encoder input for encoder-decoder models; None for decoder-only ones.
    encoder_input_ids: torch.Tensor | None = None


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the final eos included when one was produced
    provenance: str  # one letter per generated token: L (large model) or S (small model)
    counters: dict[str, int]


@dataclass
class Sequence:
    """The growing decoder sequence: prefix + generated tokens, with who produced each one."""

    tokens: list[int]
    prefix_len: int
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    device: torch.device
    provenance: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        n_new = len(self.tokens) - self.prefix_len
        return n_new >= self.max_new_tokens or (n_new > 0 and self.tokens[-1] in self.eos_ids)

    def append(self, token: int, source: str) -> None:
        self.tokens.append(token)
        self.provenance.append(source)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (n >= prefix_len)."""
        del self.tokens[n:]
        del self.provenance[n - self.prefix_len :]

    def span(self, start: int, end: int | None = None) -> torch.Tensor:
        # -> [1, end - start]
        return torch.tensor([self.tokens[start:end]], dtype=torch.long, device=self.device)


def sample_token(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling from probs [V]: the smallest top set whose mass reaches top_p."""
    sorted_p, order = torch.sort(probs, descending=True)
    # Keep a token while the mass before it is < top_p, so the top token is always kept.
    keep = (torch.cumsum(sorted_p, dim=0) - sorted_p) < top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    idx = torch.multinomial(sorted_p.float().cpu(), 1, generator=generator)
    return int(order[idx.to(order.device)])


class Policy:
    """Base class: the shared loop; subclasses set up states in `begin` and grow the sequence in `step`."""

    name = "base"

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.generator = torch.Generator()

    def decode(self, pair: ModelPair, prompt: Prompt, max_new_tokens: int, seed: int = 0) -> Generation:
        seq = Sequence(
            tokens=list(prompt.decoder_prefix),
            prefix_len=len(prompt.decoder_prefix),
            max_new_tokens=max_new_tokens,
            eos_ids=pair.eos_token_ids,
            device=pair.device,
        )
        self.counters = Counter()
        self.generator.manual_seed(seed)
        self.begin(pair, prompt)
        while not self.done(seq):
            self.step(seq)
        generated = seq.tokens[seq.prefix_len :]
        self.counters["output_tokens"] = len(generated)
        return Generation(generated, "".join(seq.provenance), dict(self.counters))

    def begin(self, pair: ModelPair, prompt: Prompt) -> None:
        raise NotImplementedError

    def step(self, seq: Sequence) -> None:
        raise NotImplementedError

    def done(self, seq: Sequence) -> bool:
        return seq.finished

    # Token choice, shared by all policies so that greedy and sampling mean the same everywhere.
    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.cfg.temperature, dim=-1)

    def choose(self, logits: torch.Tensor) -> int:
        """logits [V] → the next token: argmax, or a nucleus sample."""
        if not self.cfg.sampling:
            return int(logits.argmax())
        return sample_token(self.probs(logits), self.cfg.top_p, self.generator)
