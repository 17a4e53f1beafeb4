"""Wall-clock timing of generation only: perf_counter between device synchronisations."""

from __future__ import annotations

import contextlib
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`with Stopwatch(device) as sw: ...` then `sw.ms`; queued GPU work is waited for on both sides."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms = float("nan")

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.ms = (time.perf_counter() - self._start) * 1000.0


class PromptClock:
    """The prompt phase's share of one example's latency: the milliseconds spent in each model's pass over the
    prompt, i.e. the encoder pass of an encoder-decoder model or the first decoder pass of a decoder-only one
    (`cache.ModelState` and `layerwise.LayerwiseDecoder` time them; BiLD pays one per model). The runner
    restarts it before each timed example and reads `ms` after; `passes` == 0 means the policy ran no pass that
    these classes see (hf_assisted decodes inside transformers' generate), so its phases are unknown.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.ms, self.passes = 0.0, 0

    @contextlib.contextmanager
    def measure(self, device: torch.device):
        synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(device)
            self.ms += (time.perf_counter() - start) * 1000.0
            self.passes += 1


# One per process: the models' prompt passes add to it wherever a policy creates its states.
PROMPT_CLOCK = PromptClock()


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads and return what torch reports back (recorded with every result)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved(policies: dict, pair, prompts: list, max_new_tokens: int, warmup: int) -> dict[str, dict]:
    """Benchmarks: each policy decodes every prompt, policies interleaved example by example (A, B, C, A,
    B, C, ...) after `warmup` untimed examples each, so drift in machine load hits all of them alike.

    → name → {"ms": [per example], "tokens": [per example], "counters": summed counters}.
    """
    for policy in policies.values():
        for prompt in prompts[:warmup]:
            policy.decode(pair, prompt, max_new_tokens)
    out: dict[str, dict] = {name: {"ms": [], "tokens": [], "counters": {}} for name in policies}
    for prompt in prompts:
        for name, policy in policies.items():
            with Stopwatch(pair.device) as sw:
                gen = policy.decode(pair, prompt, max_new_tokens)
            out[name]["ms"].append(sw.ms)
            out[name]["tokens"].append(gen.tokens)
            for key, value in gen.counters.items():
                out[name]["counters"][key] = out[name]["counters"].get(key, 0) + value
    return out
