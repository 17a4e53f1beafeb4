"""Predictive Pipelined Decoding (Yang et al., 2023, Algorithm 1): the first real implementation, exact.

With d decoder layers, the early-prediction layer d̄ (d/2 <= d̄ < d) and m = d − d̄, one step is:
  early      the current token runs to layer d̄ (from layer 1, or from layer m + 1 when the previous step
             already ran it through layers 1..m as a candidate), and the exit head there gives top-k tokens;
  branch     those k candidates for the NEXT position run layers 1..m as one batch of k against the cached
             past, in a second thread (`ppd_parallel`) while the current token finishes layers d̄ + 1..d:
             both are m layers, which is why the paper needs d̄ >= d/2;
  commit     the final top-1 is the output token (greedy, so the output is the model's own); if it is one
             of the candidates, its layer-1..m K/V are adopted into the cache and its hidden state after
             layer m starts the next step, saving m layers on the critical path; otherwise all are dropped.

Counters: ppd_steps, ppd_chances (steps with a next token), ppd_adopted (of those, the ones whose next
token was a candidate: the match rate p = adopted / chances), layer_forwards (token-layer forwards
executed: Theorem 4.1's compute), critical_layers (layers on the output token's path: its latency) and
vanilla_layers (d per token). The CSV derives ppd_match_rate, theorem_latency_ratio = critical / vanilla
layers (= Theorem 4.1 at the measured p) and theorem_compute_ratio = layer_forwards / vanilla layers, to
set against the measured wall-clock ratio to vanilla decoding (scripts/bench_ppd.py).
On a CPU the second thread is the second core. On a GPU the branch runs on its own CUDA stream (from the
Python thread): it waits for the candidates on the main stream before it starts, and the main stream waits for
it before the commit reads its states, so the two m-layer halves can overlap on the device (not measured: no
GPU has been lent to this project's sessions).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from bildexp import BildexpError
from bildexp.layerwise import LayerwiseDecoder
from bildexp.policies.base import LARGE, Policy, Prompt, Sequence


class PPD(Policy):
    name = "ppd"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pool = ThreadPoolExecutor(max_workers=1) if cfg.ppd_parallel else None

    def begin(self, pair, prompt: Prompt) -> None:
        self.dec = LayerwiseDecoder(pair.large, prompt.encoder_input_ids)
        # The branch's own CUDA stream (None on a CPU, or when the branch runs in line).
        self.stream = torch.cuda.Stream(pair.device) if pair.device.type == "cuda" and self.pool else None
        d = self.dec.n_layers
        self.dbar = self.cfg.ppd_layer if self.cfg.ppd_layer is not None else -(-d // 2)
        if not d / 2 <= self.dbar < d:
            raise BildexpError(f"policy.ppd_layer={self.dbar}: use a layer in [{d / 2:g}, {d - 1}] of this {d}-layer decoder (PPD needs d̄ >= d/2)")
        self.m = d - self.dbar
        self.ahead: torch.Tensor | None = None  # [1, 1, D]: the adopted candidate's state after layer m

    @staticmethod
    def derived_columns(sums: Counter) -> dict[str, object]:
        """The match rate (adopted predictions per chance) and Theorem 4.1's latency and compute at that rate."""
        if not sums["ppd_steps"]:
            return {}
        return {"ppd_match_rate": sums["ppd_adopted"] / max(sums["ppd_chances"], 1),
                "theorem_latency_ratio": sums["critical_layers"] / sums["vanilla_layers"],
                "theorem_compute_ratio": sums["layer_forwards"] / sums["vanilla_layers"]}

    def step(self, seq: Sequence) -> None:
        dec, d, dbar, m = self.dec, self.dec.n_layers, self.dbar, self.m
        # early: the current token(s) to layer d̄
        if self.ahead is not None:
            h, self.ahead = self.ahead, None
            path = dbar
        else:
            h = dec.run(dec.embed(seq.span(dec.lengths[0])), 0, m)
            path = d
        h = dec.run(h, m, dbar)  # [1, n, D]
        candidates = torch.topk(dec.head(h[0, -1], dbar), self.cfg.ppd_top_k).indices  # [k]
        # branch ∥ finish: candidates through layers 1..m, the current token through layers d̄+1..d
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(h.device))  # the candidates exist before the branch reads them
        branch = self.pool.submit(self._branch, candidates) if self.pool else None
        logits = dec.head(dec.run(h, dbar, d)[0, -1])  # [V]
        cand_h, cand_kv = branch.result() if branch else self._branch(candidates)
        if self.stream is not None:
            torch.cuda.current_stream(h.device).wait_stream(self.stream)  # the branch's states are written before adopt
        # Per output token (a prompt's prefill, the same for vanilla decoding, is left out).
        self.counters["critical_layers"] += path
        self.counters["layer_forwards"] += path + len(candidates) * m
        # commit
        token = int(logits.argmax())
        hit = (candidates == token).nonzero()
        self.counters["ppd_steps"] += 1
        self.counters["vanilla_layers"] += d  # what vanilla decoding puts on the critical path for this token
        seq.append(token, LARGE)
        if seq.finished:
            return
        self.counters["ppd_chances"] += 1  # a next token exists, so the prediction could be adopted
        if len(hit):
            j = int(hit[0, 0])
            dec.adopt(cand_kv, j)
            self.ahead = cand_h[j : j + 1]
            self.counters["ppd_adopted"] += 1

    def _branch(self, candidates: torch.Tensor):
        with torch.inference_mode():  # inference mode is per thread
            if self.stream is None:
                return self.dec.branch(candidates, self.m)
            with torch.cuda.stream(self.stream):  # the current stream is per thread too
                return self.dec.branch(candidates, self.m)
