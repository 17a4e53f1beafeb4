"""Wall-clock timing of generation only: perf_counter between device synchronisations."""

from __future__ import annotations

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


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads and return what torch reports back (recorded with every result)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()
