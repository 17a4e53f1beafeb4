"""How many outputs of each run are token for token those of the experiment's vanilla-large greedy run.

Exactness is an fp32 property: in bf16 a k-token pass and k single steps give slightly different logits, so
lossless policies (speculative, hf_assisted, BiLD at rollback_threshold=0) flip near-tie argmaxes on some
examples. This counts them from the runs' generations.jsonl (the CSV rows do not hold the tokens).

    python scripts/identical_outputs.py results/offline/runs/qwen25_xsum
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bildexp.results import read_records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="runs/<experiment_name>/ of an output folder")
    args = parser.parse_args()
    runs = {}
    for folder in sorted(p for p in args.runs.iterdir() if (p / "generations.jsonl").is_file()):
        config = json.loads((folder / "config.json").read_text())
        # the run's policy, and whether it is a repeated measurement of a setting (runner.repeat > 0)
        repeat = config.get("runner", {}).get("repeat", 0)
        runs[folder.name] = (config["policy"] | {"repeat": repeat},
                             {r["id"]: r["tokens"] for r in read_records(folder / "generations.jsonl")})
    # the reference: the first greedy vanilla-large run (its repeats, timed again later, are compared with it too)
    base = [name for name, (p, _) in runs.items()
            if p["name"] == "vanilla" and p["which"] == "large" and not p["sampling"] and not p["repeat"]]
    if len(base) != 1:
        print(f"need exactly one greedy vanilla-large run in {args.runs}, found {len(base)}", file=sys.stderr)
        return 2
    reference = runs[base[0]][1]
    for name, (_, tokens) in runs.items():
        shared = [i for i in tokens if i in reference]
        same = sum(tokens[i] == reference[i] for i in shared)
        print(f"{name}: {same}/{len(shared)} identical to {base[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
