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

from bildexp.cache import ModelState
from bildexp.config import PolicyConfig
from bildexp.layerwise import SharedLayers
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
    """The growing decoder sequence: prefix + generated tokens, with who produced each one.

    The tokens live twice: as Python ints (what the policies decide on) and in a buffer on the models' device, which
    `append` writes one element at a time (a fill on the device: no host-device sync) and `span` slices (a view: no
    copy), so feeding the models never waits for the device."""

    tokens: list[int]
    prefix_len: int
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    device: torch.device
    provenance: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = torch.empty(len(self.tokens) + self.max_new_tokens + 1, dtype=torch.long, device=self.device)
        self._ids[: len(self.tokens)] = torch.tensor(self.tokens, dtype=torch.long)  # the prefix: one copy per example

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        n_new = len(self.tokens) - self.prefix_len
        return n_new >= self.max_new_tokens or (n_new > 0 and self.tokens[-1] in self.eos_ids)

    def append(self, token: int, source: str) -> None:
        n = len(self.tokens)
        if n == len(self._ids):  # past max_new_tokens (never in the policies' loop): room for as many again
            self._ids = torch.cat([self._ids, torch.empty_like(self._ids)])
        self._ids[n] = token
        self.tokens.append(token)
        self.provenance.append(source)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (n >= prefix_len)."""
        del self.tokens[n:]
        del self.provenance[n - self.prefix_len :]

    def span(self, start: int, end: int | None = None) -> torch.Tensor:
        """tokens[start:end] on the device → [1, end - start] (a view of the buffer: read it before the next append)."""
        start, end, _ = slice(start, end).indices(len(self.tokens))
        return self._ids[start:end].unsqueeze(0)


def top_nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """probs [V] → (the smallest top set whose mass reaches top_p, renormalised, in descending order [n]; its
    tokens [n]). A partial sort (`topk`, widened until the set is inside it) instead of sorting all V: at mT5's
    V = 250k a full sort costs ~22 ms on a CPU core, topk of a few hundred ~1-3 ms. top_p >= 1: every token, no
    sort at all (tokens None: the index is the token)."""
    if top_p >= 1.0:  # keep every token (a float cumsum may pass 1 before the last one)
        return probs, None
    vocab = probs.shape[-1]
    k = min(64, vocab)
    while k < vocab:
        top, tokens = torch.topk(probs, k)  # sorted, descending
        if float(top.sum()) >= top_p:  # the set lies inside the top k
            break
        k = 4 * k if 4 * k <= vocab // 4 else vocab  # a flat distribution: past a quarter of V, one full sort is cheaper
    if k >= vocab:
        top, tokens = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(top, dim=-1) - top
    # Keep a token while the mass before it is < top_p, so the top token is always kept.
    n = int((mass_before < top_p).sum())
    return top[:n] / top[:n].sum(), tokens[:n]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [..., V] → the smallest top set whose mass reaches top_p, renormalised, in vocabulary order [..., V]."""
    if probs.dim() > 1:
        return torch.stack([nucleus(row, top_p) for row in probs])
    kept, tokens = top_nucleus(probs, top_p)
    return kept if tokens is None else torch.zeros_like(probs).scatter(-1, tokens, kept)


def draw(weights: torch.Tensor, tokens: torch.Tensor | None, generator: torch.Generator) -> int:
    """One token with probability proportional to weights [n] (tokens [n], or None: the index is the token), by
    inverting the cumulative sum at one uniform draw of the generator, on the generator's device."""
    cumulative = torch.cumsum(weights.double(), dim=-1)
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64) * cumulative[-1]
    i = torch.searchsorted(cumulative, u.reshape(1), right=True).clamp(max=len(weights) - 1)  # a zero weight is never hit
    return int(i) if tokens is None else int(tokens[i])


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] (need not sum to 1)."""
    return draw(probs, None, generator)


def sample_token(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling from probs [V]: the smallest top set whose mass reaches top_p."""
    return draw(*top_nucleus(probs, top_p), generator)


def model_states(pair: ModelPair, prompt: Prompt, meter: Counter | None = None) -> tuple:
    """Fresh decoding states (large, small) for one example: two `ModelState`s, or for an early-exit pair
    the two views of one `SharedLayers` (the small model = the large model's first layers).
    meter: counters that the two `ModelState`s add each forward pass's work to (large_*, small_*)."""
    if pair.small_layers is not None:
        shared = SharedLayers(pair.large, pair.small_layers, prompt.encoder_input_ids)
        return shared.large, shared.small
    return (model_state(pair, "large", prompt, meter), model_state(pair, "small", prompt, meter))


def model_state(pair: ModelPair, role: str, prompt: Prompt, meter: Counter | None = None) -> ModelState:
    """A fresh `ModelState` of the pair's `role` model ("large" or "small") for one example, on the pair's
    static decoder of that model when it has one (pair.cache=static)."""
    model = pair.large if role == "large" else pair.small
    static = pair.static[role] if pair.static else None
    return ModelState(model, prompt.encoder_input_ids, meter, role, static)


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
        self.reset(seed, pair.device)
        self.begin(pair, prompt)
        while not self.done(seq):
            self.step(seq)
        generated = seq.tokens[seq.prefix_len :]
        self.counters["output_tokens"] = len(generated)
        return Generation(generated, "".join(seq.provenance), dict(self.counters))

    def reset(self, seed: int, device: torch.device | None = None) -> None:
        """Fresh counters and random stream for one example; the stream lives on the models' device, so a sampled
        token is drawn there (no V-sized copy to the host)."""
        self.counters = Counter()
        if device is not None and self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def begin(self, pair: ModelPair, prompt: Prompt) -> None:
        raise NotImplementedError

    def max_pass_tokens(self) -> int:
        """The most tokens one forward pass past the prefix can feed a model (a verification window); the
        static path compiles a graph for each bucket up to it before timing."""
        return 1

    def step(self, seq: Sequence) -> None:
        raise NotImplementedError

    def done(self, seq: Sequence) -> bool:
        return seq.finished

    @staticmethod
    def derived_columns(sums: Counter) -> dict[str, object]:
        """The row's columns this policy derives from its counters summed over a run's examples (a counter no
        example incremented reads 0); the runner adds them to the row."""
        return {}

    # Token choice, shared by all policies so that greedy and sampling mean the same everywhere.
    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] → the temperature-scaled softmax [..., V] (no nucleus filter)."""
        return torch.softmax(logits.float() / self.cfg.temperature, dim=-1)

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] → the distribution a sampled token is drawn from: temperature, then nucleus [..., V]."""
        return nucleus(self.probs(logits), self.cfg.top_p)

    def choose(self, logits: torch.Tensor, probs: torch.Tensor | None = None) -> int:
        """logits [V] → the next token: argmax, or a sample from `dist` (one softmax, or `probs` = self.probs(logits)
        when the caller has it already, and one partial sort)."""
        if not self.cfg.sampling:
            return int(logits.argmax())
        return sample_token(self.probs(logits) if probs is None else probs, self.cfg.top_p, self.generator)
