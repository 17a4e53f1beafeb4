"""A prompt pass with the LM head on every position against the head on the last position only (`logits_to_keep`).

A decoder's prompt pass needs one row of logits (the next token's), but a forward without `logits_to_keep` computes
the head on every position: [k, V] logits, with V = 151,936 for Qwen2.5 (the head is 15 % of the 1.5B model's weights,
28 % of the 0.5B's). Times both models of a pair, as the pair loads them (its dtype and weight quantization, eager
DynamicCache), on random prompts of the given lengths, both ways: what bildexp's static path saved when its prompt
passes took `logits_to_keep` (the dynamic path always did).

    OMP_WAIT_POLICY=ACTIVE python scripts/bench_prompt_head.py --pair qwen25_int4 --lengths 45,341 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from bildexp.config import compose_config
from bildexp.models import load_pair


def _prompt_ms(model, ids: torch.Tensor, keep: int, reps: int) -> float:
    """Median ms of a prompt pass over ids [1, n] on a fresh cache, keeping the logits of the last `keep` positions
    (0: all of them), after one untimed pass."""
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=keep)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="qwen25_int4", help="pair config (default qwen25_int4)")
    ap.add_argument("--lengths", default="45,341", help="prompt lengths in tokens (default 45,341: WMT's and XSUM's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed passes per cell (median; default 5)")
    args = ap.parse_args()
    cfg = compose_config(f"pair={args.pair}", f"pair.threads={args.threads}", "pair.cache=dynamic", "pair.compile=none").pair
    torch.set_num_threads(args.threads)
    pair = load_pair(cfg)
    print(f"pair {cfg.name}, dtype {cfg.dtype}, device {pair.device}, threads {args.threads}, eager DynamicCache, "
          f"medians of {args.reps}, torch {torch.__version__}")
    print("| model | weights | prompt tokens | head on all ms | head on last ms | all / last |\n|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for role, model, quant in (("large", pair.large, cfg.large_quant), ("small", pair.small, cfg.small_quant)):
            for n in (int(x) for x in args.lengths.split(",")):
                ids = torch.randint(100, model.config.vocab_size - 100, (1, n), generator=gen).to(pair.device)
                full, last = (_prompt_ms(model, ids, keep, args.reps) for keep in (0, 1))
                print(f"| {role} | {quant} | {n} | {full:.1f} | {last:.1f} | {full / last:.2f} |", flush=True)


if __name__ == "__main__":
    main()
