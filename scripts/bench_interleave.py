"""Does interleaving make speedups repeatable? The same sweep timed twice interleaved (`runner.interleave`: every point
example by example in rotating order) and twice sequentially (point after point, as a Hydra sweep runs them), each
time from scratch into a scratch folder, through the harness's own runner. Prints every point's speedup over the
vanilla-large run of the same sweep (bildexp's baseline rule) for the four sweeps, and per mode the largest relative
difference between its two repetitions: the spread drift leaves in a speedup. Threads, dtype, device and the time
of each sweep are printed. Alone on the machine.

    python scripts/bench_interleave.py --limit 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd

from bildexp import plots
from bildexp.config import compose_config
from bildexp.models import PairCache
from bildexp.results import run_id
from bildexp.runner import run, run_interleaved

# vanilla large first (a sequential sweep's order), then BiLD unaligned and aligned at the Figure-4 settings whose
# margins decide C1/C2, and the small model.
POINTS = [
    ["pair=t5_multi30k", "policy=vanilla", "policy.which=large"],
    ["pair=t5_multi30k", "policy=bild", "policy.fallback_threshold=0.5", "policy.rollback_threshold=2"],
    ["pair=t5_multi30k_aligned", "policy=bild", "policy.fallback_threshold=0.5", "policy.rollback_threshold=2"],
    ["pair=t5_multi30k", "policy=bild", "policy.fallback_threshold=0.7", "policy.rollback_threshold=4"],
    ["pair=t5_multi30k", "policy=vanilla", "policy.which=small"],
]


def sweep(mode: str, rep: int, limit: int, extra: list[str]) -> pd.DataFrame:
    folder = tempfile.mkdtemp(prefix=f"bench_interleave_{mode}{rep}_")
    cfgs = [compose_config("experiment=baselines_t5_multi30k", *p, f"runner.limit={limit}", "runner.progress=false",
                           f"runner.output_dir={folder}", f"experiment_name=bench_{mode}{rep}", *extra) for p in POINTS]
    started = time.strftime("%H:%M:%S")
    pairs = PairCache()  # models load afresh for every sweep, as they would in a new process
    rows = run_interleaved(cfgs, pairs) if mode == "interleaved" else [run(c, pairs) for c in cfgs]
    df = plots.with_speedup(pd.DataFrame(rows))
    labels = {run_id(c): " ".join(o.split("=", 1)[1] for o in p if not o.startswith("policy=")) for c, p in zip(cfgs, POINTS)}
    print(f"{mode} #{rep}: started {started} UTC, {len(rows)} points, {limit} sentences", file=sys.stderr)
    return pd.DataFrame({"point": [labels[r] for r in df["run_id"]], "ms": df["latency_ms_mean"], "speedup": df["speedup"],
                         "rule": df["baseline_rule"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="Multi30k test sentences per point (default 200)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every point (pair.cache=static ...)")
    args = parser.parse_args()
    cfg = compose_config("experiment=baselines_t5_multi30k", *POINTS[0], *args.overrides)
    import torch

    print(f"threads {cfg.pair.threads}, dtype {cfg.pair.dtype}, device {cfg.pair.device} (torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), overrides {args.overrides or 'none'}")
    # Alternate the modes, so that a slow hour of the machine does not fall on one of them only.
    runs = {(mode, rep): sweep(mode, rep, args.limit, args.overrides)
            for rep in (1, 2) for mode in ("interleaved", "sequential")}
    table = pd.DataFrame({"point": runs[("interleaved", 1)]["point"]})
    for (mode, rep), df in runs.items():
        table[f"{mode} #{rep} ms"] = df["ms"].round(2).values
        table[f"{mode} #{rep} speedup"] = df["speedup"].round(3).values
    print(table.to_string(index=False))
    for mode in ("interleaved", "sequential"):
        a, b = runs[(mode, 1)]["speedup"].values, runs[(mode, 2)]["speedup"].values
        spread = abs(a - b) / ((a + b) / 2)
        print(f"{mode}: largest difference between its two sweeps' speedups {100 * spread.max():.1f} % "
              f"(mean {100 * spread.mean():.1f} %); baselines: {', '.join(sorted(set(runs[(mode, 1)]['rule'])))}")


if __name__ == "__main__":
    main()
