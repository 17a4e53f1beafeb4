"""Predictive Pipelined Decoding (Yang et al., 2023): the paper's latency/compute model as code.

Times are in layer-forward units (one decoder layer for one token = 1), so a vanilla token costs d.
An early prediction at layer d̄ (top-k candidates) is correct with probability p (the match rate);
tokens form runs of consecutive correct predictions, and a run of X tokens takes d + (X - 1) d̄.

    expected_latency(d, d̄, ℓ, p)          Theorem 4.1: dℓ − (d − d̄)(ℓ − 1)p
    expected_compute(d, d̄, ℓ, p, k)       Theorem 4.1: dℓ − (d − d̄)(ℓ − 1)p + k(d − d̄)ℓ
    latency_per_token(p)                  Equation 2 (d̄ = d/2, ℓ ≫ 1): 1 − p/2, as a share of d
    compute_per_time(p, k)                Equation 4: (k + 2 − p) / (2 − p) compute units per time unit
    compute_per_token(p, k)               Equation 6: (2 + k − p) / 2, as a share of d
    simulate(d, d̄, ℓ, p, k, trials, seed) Monte Carlo of the pipeline: run lengths drawn as geometric
                                          variables, each run's time and compute summed as in the proof

`trade_off_figure` draws the paper's Figures 2 and 4 (latency against compute per time unit, and per
token) with measured match rates as points.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def expected_latency(d: float, dbar: float, ell: int, p: float) -> float:
    return d * ell - (d - dbar) * (ell - 1) * p


def expected_compute(d: float, dbar: float, ell: int, p: float, k: int) -> float:
    return expected_latency(d, dbar, ell, p) + k * (d - dbar) * ell


def latency_per_token(p):
    return 1 - np.asarray(p) / 2


def compute_per_time(p, k: int):
    p = np.asarray(p)
    return (k + 2 - p) / (2 - p)


def compute_per_token(p, k: int):
    return (2 + k - np.asarray(p)) / 2


def simulate(d: float, dbar: float, ell: int, p: float, k: int, trials: int = 20000, seed: int = 0) -> tuple[float, float]:
    """Mean total latency and compute of generating ℓ tokens over `trials` simulated generations.

    A run continues while early predictions are correct, so its length X is geometric with success
    probability 1 − p (support 1, 2, ...), cut at the tokens still to generate. A run costs d + (X − 1)d̄
    time; for (d − d̄)X of it k + 1 units compute (the main token and k candidates), else one.
    """
    rng = np.random.default_rng(seed)
    remaining = np.full(trials, ell)
    latency = np.zeros(trials)
    compute = np.zeros(trials)
    while (active := remaining > 0).any():
        x = remaining.copy() if p >= 1.0 else np.minimum(rng.geometric(1.0 - p, size=trials), remaining)
        x = np.where(active, x, 0)
        t = np.where(active, d + (x - 1) * dbar, 0.0)
        latency += t
        compute += np.where(active, t - (d - dbar) * x + (k + 1) * (d - dbar) * x, 0.0)
        remaining -= x
    return float(latency.mean()), float(compute.mean())


def trade_off_figure(points: dict[str, dict[int, float]], ks: tuple[int, ...] = (1, 3, 5)) -> Figure:
    """PPD Figures 2 and 4 (d̄ = d/2): normalised per-token latency against compute units per time unit
    (left) and per token (right), as curves over p for each k, with measured match rates as points.

    points: label (e.g. "multi30k layer 2") → {k: measured match rate at d̄ = d/2}.
    """
    fig = Figure(figsize=(11, 4.3), layout="constrained")
    left, right = fig.subplots(1, 2)
    p = np.linspace(0, 1, 101)
    colors = {k: c for k, c in zip(ks, ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"])}
    markers = ["o", "s", "^", "D", "v", "P"]
    for k in ks:
        left.plot(compute_per_time(p, k), latency_per_token(p), color=colors[k], lw=1, label=f"k = {k} (p from 0 to 1)")
        right.plot(compute_per_token(p, k), latency_per_token(p), color=colors[k], lw=1, label=f"k = {k}")
    for (label, rates), marker in zip(sorted(points.items()), markers):
        for k, rate in sorted(rates.items()):
            if k not in colors:
                continue
            kw = dict(color=colors[k], marker=marker, s=40, edgecolor="k", lw=0.5, zorder=3)
            left.scatter([compute_per_time(rate, k)], [latency_per_token(rate)], **kw)
            right.scatter([compute_per_token(rate, k)], [latency_per_token(rate)], **kw)
        right.scatter([], [], marker=marker, color="w", edgecolor="k", label=label)
    left.set_xlabel("compute units per time unit (Eq. 4)")
    right.set_xlabel("compute per token / d (Eq. 6)")
    for ax in (left, right):
        ax.set_ylabel("latency per token / d (Eq. 2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("PPD latency-compute trade-off at d̄ = d/2 (points: measured match rates)", fontsize=10)
    return fig


# ------------------------------------------------------------------------- match-rate tables (CSV → Markdown)
def match_rates(df: pd.DataFrame) -> pd.DataFrame:
    """ppd_match rows of a results CSV → one row per (run, layer, k, bucket) with the match rate.

    bucket is "total" or the 0-based token-position bucket; positions is its token range.
    """
    out = []
    for _, r in df[df["policy"] == "ppd_match"].iterrows():
        d = int(r["decoder_layers"] / r["n_examples"])
        width = -(-int(r["max_new_tokens"]) // 8)
        for col in r.index:
            m = re.fullmatch(r"match_l(\d+)_k(\d+)(?:_p(\d+))?", col)
            if m is None or pd.isna(r[col]):
                continue
            layer, k, b = int(m[1]), int(m[2]), m[3]
            steps = r["match_steps" if b is None else f"match_steps_p{b}"]
            if pd.isna(steps) or steps == 0:
                continue
            positions = "total" if b is None else f"{int(b) * width + 1}–{(int(b) + 1) * width}"
            trained = "N" if pd.isna(r.get("match_heads")) else "Y"
            out.append({"task": r["task"], "pair": r["pair"], "d": d, "layer": layer, "k": k, "trained": trained,
                        "bucket": "total" if b is None else int(b), "positions": positions, "rate": r[col] / steps})
    return pd.DataFrame(out)


def table1(df: pd.DataFrame) -> str:
    """PPD Table 1 layout: rows (task / pair, top-k, trained), columns the checked layers."""
    rates = match_rates(df)
    rates = rates[rates["bucket"] == "total"]
    lines = []
    for (task, pair, d), g in rates.groupby(["task", "pair", "d"], sort=True):
        layers = sorted(g["layer"].unique())
        lines += [f"**{task} / {pair}** (d = {d} decoder layers)", "",
                  "| top-k | trained | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
                  "|---|---|" + "---|" * len(layers)]
        for (k, trained), row in g.groupby(["k", "trained"], sort=True):
            cells = [f"{100 * row[row['layer'] == layer]['rate'].iloc[0]:.2f}%" for layer in layers]
            lines.append(f"| {k} | {trained} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def position_tables(df: pd.DataFrame) -> str:
    """PPD Tables 4-6 layout: per task / pair, rows (layer, top-k, trained), columns token-position buckets."""
    rates = match_rates(df)
    lines = []
    for (task, pair, d), g in rates.groupby(["task", "pair", "d"], sort=True):
        buckets = g[g["bucket"] != "total"].drop_duplicates("bucket").sort_values("bucket")
        lines += [f"**{task} / {pair}** (d = {d})", "",
                  "| layer | top-k | trained | " + " | ".join(buckets["positions"]) + " | total |",
                  "|---|---|---|" + "---|" * (len(buckets) + 1)]
        for (layer, k, trained), row in g.groupby(["layer", "k", "trained"], sort=True):
            by = {b: rate for b, rate in zip(row["bucket"], row["rate"])}
            cells = [f"{100 * by[b]:.2f}%" if b in by else "—" for b in list(buckets["bucket"]) + ["total"]]
            lines.append(f"| {layer} | {k} | {trained} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def half_depth_points(df: pd.DataFrame) -> dict[str, dict[int, float]]:
    """Measured match rates at d̄ = d/2 (rounded down) per task / pair: the points of Figures 2 and 4."""
    rates = match_rates(df)
    rates = rates[(rates["bucket"] == "total") & (rates["layer"] == rates["d"] // 2)]
    return {f"{t} / {p}, trained {tr} (layer {int(g['layer'].iloc[0])} of {int(g['d'].iloc[0])})": dict(zip(g["k"], g["rate"]))
            for (t, p, tr), g in rates.groupby(["task", "pair", "trained"], sort=True)}
