"""bildexp's speculative greedy decoding against transformers' assisted generation, on one pair and one clock.

Both are exact (greedy output = the large model's), so their outputs must be identical token for token;
the script checks that on every example and reports the ratio of their mean latencies, plus vanilla
large for reference. Policies run interleaved example by example (A, B, C, A, B, C, ...) after a warm-up,
so that drift in machine load hits all of them alike. Threads, dtype, device and versions are printed.

    python scripts/bench_speculative.py --experiment baselines_t5_multi30k --pair t5_multi30k --windows 3,4,6 --limit 100
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bildexp.config import PolicyConfig
from bildexp.policies import make_policy
from bildexp.runner import benchmark_inputs
from bildexp.timing import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="baselines_t5_multi30k", help="experiment config giving the task and split")
    ap.add_argument("--pair", default="t5_multi30k")
    ap.add_argument("--windows", default="3,4,6", help="num_draft_tokens values")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    cfg, pair, prompts, header = benchmark_inputs(args.experiment, args.pair, args.limit, args.device)
    max_new = cfg.task.max_new_tokens
    print(header)

    policies = {"vanilla-large": make_policy(PolicyConfig(name="vanilla"))}
    for k in (int(x) for x in args.windows.split(",")):
        policies[f"speculative-k{k}"] = make_policy(PolicyConfig(name="speculative", num_draft_tokens=k))
        policies[f"hf_assisted-k{k}"] = make_policy(PolicyConfig(name="hf_assisted", num_draft_tokens=k))
    runs = interleaved(policies, pair, prompts, max_new, args.warmup)
    ms = {name: r["ms"] for name, r in runs.items()}
    tokens = {name: r["tokens"] for name, r in runs.items()}

    base = statistics.mean(ms["vanilla-large"])
    print(f"{'policy':<18} {'mean ms':>9} {'p50 ms':>8} {'vs vanilla':>10}  identical to vanilla-large greedy")
    for name in policies:
        same = sum(a == b for a, b in zip(tokens[name], tokens["vanilla-large"]))
        mean = statistics.mean(ms[name])
        print(f"{name:<18} {mean:9.1f} {statistics.median(ms[name]):8.1f} {base / mean:9.2f}x  {same}/{len(prompts)}")
    for k in (int(x) for x in args.windows.split(",")):
        a, b = f"speculative-k{k}", f"hf_assisted-k{k}"
        same = sum(x == y for x, y in zip(tokens[a], tokens[b]))
        ratio = statistics.mean(ms[b]) / statistics.mean(ms[a])
        print(f"window {k}: hf_assisted / bildexp speculative latency = {ratio:.2f}x; identical outputs {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
