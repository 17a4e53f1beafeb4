"""PPD Theorem 4.1 against a Monte-Carlo simulation of the pipeline, at measured match rates.

For every ppd_match run in a results CSV, every checked layer d̄ >= d/2 and every k, print the expected
latency and compute of generating ℓ tokens (ℓ = the run's mean output length, rounded) from the theorem
and from `bildexp.ppd.simulate`, and their relative difference.

    python scripts/ppd_theorem.py --csv results/ppd.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

from bildexp import ppd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default="results/ppd.csv")
    ap.add_argument("--trials", type=int, default=20000)
    args = ap.parse_args()
    df = pd.read_csv(args.csv)
    rates = ppd.match_rates(df)
    rates = rates[(rates["bucket"] == "total") & (rates["layer"] >= rates["d"] / 2)]
    ell = {(r["task"], r["pair"]): max(2, round(r["output_tokens_mean"])) for _, r in df[df["policy"] == "ppd_match"].iterrows()}
    print("| task / pair | trained | d | d̄ | ℓ | k | p | latency: theorem | simulated | Δ | compute: theorem | simulated | Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for _, r in rates.sort_values(["task", "pair", "trained", "layer", "k"]).iterrows():
        d, dbar, k, p, n = int(r["d"]), int(r["layer"]), int(r["k"]), float(r["rate"]), ell[(r["task"], r["pair"])]
        lat, comp = ppd.simulate(d, dbar, n, p, k, trials=args.trials)
        el, ec = ppd.expected_latency(d, dbar, n, p), ppd.expected_compute(d, dbar, n, p, k)
        worst = max(worst, abs(lat / el - 1), abs(comp / ec - 1))
        print(f"| {r['task']} / {r['pair']} | {r['trained']} | {d} | {dbar} | {n} | {k} | {p:.4f} | {el:.1f} | {lat:.1f} | "
              f"{100 * (lat / el - 1):+.2f}% | {ec:.1f} | {comp:.1f} | {100 * (comp / ec - 1):+.2f}% |")
    print(f"\nlargest relative difference: {100 * worst:.2f}% ({args.trials} simulated generations per row)")


if __name__ == "__main__":
    main()
