"""Results CSV → the paper's Figure 4 (quality vs normalised latency), Table 1 (best speedups), and the
baselines view: BiLD, speculative, CALM and BiLD early exit on one plot, and Tables 3-4.

This module owns every view built from a results CSV: finding the vanilla-large baseline of each
(task, device, dtype) group, speedups against it, the Figure-4 scatter and the Table-1 Markdown.
Everything is a pure function of a DataFrame except `save_*` and `make_all`, which touch disk.
Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so importing this
module selects no backend and registers no global figure (savefig renders with Agg).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.lines as mlines
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bildexp import BildexpError
from bildexp.config import PolicyConfig

# Speedups only compare runs on the same task, hardware and numeric precision.
GROUP = ["task", "device", "dtype"]
# The paper's "within ~1 point" quality band, in headline-score points.
ONE_POINT = 1.0

_MARKERS = ["o", "s", "^", "D", "v", "P"]


class MissingBaselineError(BildexpError, ValueError):
    """A (task, device, dtype) group has no vanilla-large row to normalise against."""


def _as_bool(col: pd.Series) -> pd.Series:
    # A CSV column read back may hold bools, "True"/"False" strings or blanks; blanks mean greedy.
    text = col.astype("string").str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"]).astype(bool)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["sampling"] = _as_bool(out["sampling"]) if "sampling" in out else False
    out["which"] = out["which"].astype("string").fillna("")
    out["_time"] = pd.to_datetime(out["time"], utc=True, format="ISO8601")
    return out


def _group_name(key: tuple) -> str:
    return "task={} device={} dtype={}".format(*key)


def _vanilla_runs(df: pd.DataFrame, which: str, pair: str | None = None, sampling: bool = False) -> pd.DataFrame:
    """Every greedy (or, with sampling, sampled) vanilla row for one model size (`which`), of `pair` when given."""
    df = _normalise(df)
    rows = df[(df["policy"] == "vanilla") & (df["which"] == which) & (df["sampling"] == sampling)]
    return rows if pair is None else rows[rows["pair"] == pair]


def _vanilla(df: pd.DataFrame, which: str, pair: str | None = None, sampling: bool = False) -> pd.DataFrame:
    """The latest greedy (or, with sampling, sampled) vanilla row of each group for one model size (`which`),
    of `pair` when given (else of any pair); may miss groups."""
    rows = _vanilla_runs(df, which, pair, sampling)
    # Re-running a baseline appends a row; the newest one reflects the current code.
    rows = rows.sort_values("_time").groupby(GROUP, dropna=False, sort=True).tail(1)
    return rows.drop(columns="_time").sort_values(GROUP).reset_index(drop=True)


def baseline_rows(df: pd.DataFrame, pair: str | None = None) -> pd.DataFrame:
    """One vanilla-large greedy row per (task, device, dtype) group (of `pair` when given: with several
    large models in one CSV, the one every speedup is against); raises if a group lacks one."""
    base = _vanilla(df, "large", pair)
    have = set(base[GROUP].itertuples(index=False, name=None))
    for key, rows in df.groupby(GROUP, dropna=False, sort=True):
        if key not in have:
            pairs = sorted(rows["pair"].dropna().astype(str).unique())
            pair_arg = pair or (pairs[0] if pairs else "<pair>")
            raise MissingBaselineError(
                f"no vanilla-large baseline for {_group_name(key)}; run: bildexp run "
                f"task={key[0]} pair={pair_arg} policy=vanilla policy.which=large "
                f"pair.device={key[1]} pair.dtype={key[2]}"
            )
    return base


# The baseline rule, the one place every speedup of every table and figure is divided (docs/harness.md, "Baselines"):
# a run is divided by a vanilla-large row COMPARABLE with it (same task, example count, device, dtype, threads,
# backend and large model: anything else is refused in one line), and of those by the one of its own interleave
# group (runner.interleave: timed example by example alongside it); else by the nearest in time of its sitting (same
# git SHA); else by the nearest in time of any sitting, and `baseline_rule` says which.
COMPARABLE = ["task", "n_examples", "device", "dtype", "threads", "cache", "compile", "freeze", "large"]
_COMPARABLE_DEFAULTS = {"cache": "dynamic", "compile": "none", "freeze": False}  # rows from before these columns


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The COMPARABLE columns as text (absent or blank backend columns at their defaults)."""
    out = pd.DataFrame(index=df.index)
    for c in COMPARABLE:
        col = df[c] if c in df else pd.Series(np.nan, index=df.index)
        out[c] = _as_bool(col) if c == "freeze" else col.astype(object).fillna(_COMPARABLE_DEFAULTS.get(c, ""))
    return out.astype(str)


def against_baselines(rows: pd.DataFrame, pool: pd.DataFrame, pair: str | None = None,
                      sampling: bool = False) -> pd.DataFrame:
    """`rows` with normalized_latency, speedup, quality_delta and the baseline each divides by (baseline_run,
    baseline_rule), chosen among `pool`'s greedy (sampling: sampled) vanilla-large rows by the baseline rule; `pair`,
    when given, is preferred among comparable rows (several large models' pairs in one CSV)."""
    out = _normalise(rows)
    vanilla = _vanilla_runs(pool, "large", sampling=sampling)
    keys, vkeys = _comparable(out), _comparable(vanilla)
    picked, rules = [], []
    for i, row in out.iterrows():
        cands = vanilla[(vkeys == keys.loc[i]).all(axis=1)]
        if cands.empty:
            raise MissingBaselineError(_no_baseline(row, keys.loc[i], vanilla, vkeys, sampling))
        if pair is not None and (cands["pair"] == pair).any():
            cands = cands[cands["pair"] == pair]
        group = row.get("interleave_group", np.nan)
        interleaved = cands[cands["interleave_group"] == group] if "interleave_group" in cands and pd.notna(group) else cands.iloc[:0]
        sitting = cands[cands["git_sha"] == row.get("git_sha")] if "git_sha" in cands else cands.iloc[:0]
        if len(interleaved):
            cands, rule = interleaved, "interleaved"
        elif len(sitting):
            cands, rule = sitting, "same sitting"
        else:
            rule = "other sitting"
        gap = (cands["_time"] - row["_time"]).abs()
        picked.append(cands.loc[gap.idxmin()])
        rules.append(rule)
    base = pd.DataFrame([p.to_dict() for p in picked], index=out.index, columns=vanilla.columns)
    mixed = out["headline_metric"].notna() & (out["headline_metric"] != base["headline_metric"])
    if mixed.any():
        # A rougeL score minus a rougeLsum baseline is a meaningless delta: refuse rather than plot it.
        row = out[mixed].iloc[0]
        raise ValueError(f"run {row['run_id']} reports {row['headline_metric']} but its baseline "
                         f"{base.loc[row.name, 'run_id']} reports {base.loc[row.name, 'headline_metric']}; "
                         "re-run one of them with the same metric")
    out["normalized_latency"] = out["latency_ms_mean"] / base["latency_ms_mean"]
    out["speedup"] = 1.0 / out["normalized_latency"]
    out["quality_delta"] = out["headline_score"] - base["headline_score"]
    out["baseline_run"] = base["run_id"]
    out["baseline_rule"] = rules
    out["baseline_time"] = base["time"]
    return out.drop(columns="_time")


def _no_baseline(row: pd.Series, key: pd.Series, vanilla: pd.DataFrame, vkeys: pd.DataFrame, sampling: bool) -> str:
    """One line: which run has no comparable vanilla-large row, and how the nearest one differs."""
    what = "sampled vanilla-large" if sampling else "vanilla-large"
    if vanilla.empty:
        differs = f"the CSV has no {what} run"
    else:
        near = (vkeys != key).sum(axis=1).idxmin()
        differs = "nearest differs in " + ", ".join(f"{c} ({vkeys.loc[near, c]} vs {key[c]})"
                                                   for c in COMPARABLE if vkeys.loc[near, c] != key[c])
    return (f"run {row['run_id']}: no {what} run to divide by with the same {', '.join(COMPARABLE)} ({differs}); "
            f"run: bildexp run task={key['task']} pair={row.get('pair', '<pair>')} policy=vanilla policy.which=large"
            f" with its settings")


def with_speedup(df: pd.DataFrame, pair: str | None = None) -> pd.DataFrame:
    """Adds normalized_latency, speedup and quality_delta, each row against its baseline (the baseline rule above)."""
    return against_baselines(df, df, pair)


def _fmt(x: float) -> str:
    # Thresholds print as written in configs (0.6, 2), never 0.6000000000000001 or 2.0.
    return f"{float(x):g}"


def _thresholds(row: pd.Series) -> str:
    if pd.isna(row.get("rollback_threshold")) and pd.isna(row.get("fallback_threshold")):
        return ""
    return f"({_fmt(row['rollback_threshold'])}, {_fmt(row['fallback_threshold'])})"


def _pair_variant(pairs: pd.Series) -> pd.Series:
    """What sets a pair apart from the other pairs of its group ("aligned"), or "" if it is alone.

    Pair names differ per task anyway; stripping the group's common prefix lets "mt5-iwslt" and
    "mt5-iwslt-aligned" become the paper's two BiLD rows, shared across tasks.
    """
    names = pairs.astype(str)
    stem = os.path.commonprefix(sorted(names.unique()))
    return names.str[len(stem):].str.strip("-_ ./")


def _methods(df: pd.DataFrame, pair: str | None = None) -> pd.DataFrame:
    """Non-vanilla rows with speedups and a `series` label: policy, pair variant, sampling."""
    rows = _normalise(with_speedup(df, pair))
    rows = rows[rows["policy"] != "vanilla"].dropna(subset=["headline_score", "latency_ms_mean"])
    variant = rows.groupby(GROUP + ["policy"], dropna=False)["pair"].transform(_pair_variant)
    rows["series"] = [", ".join([str(p)] + ([v] if v else []) + (["sampling"] if smp else []))
                      for p, v, smp in zip(rows["policy"], variant, rows["sampling"])]
    return rows


def fastest(rows: pd.DataFrame, floor: float) -> pd.Series | None:
    """The fastest run scoring at least `floor` (on equal speed the better score wins), or None."""
    ok = rows[rows["headline_score"] >= floor]
    return None if ok.empty else ok.sort_values(["speedup", "headline_score"], ascending=False).iloc[0]


def table1_frame(df: pd.DataFrame, baseline_pair: str | None = None) -> pd.DataFrame:
    """Table 1 as data: per group and series, the fastest "no loss" and "within 1 point" rows.

    Returns one row per (group, series, criterion) with criterion in {"no loss", "within 1 point"};
    groups where no run qualifies are left out (table1 prints them as "—").
    """
    base = with_speedup(baseline_rows(df, baseline_pair), baseline_pair)
    methods = _methods(df, baseline_pair)
    picked = []
    for _, b in base.iterrows():
        same = (methods[GROUP] == b[GROUP].values).all(axis=1)
        for series, rows in methods[same].groupby("series", sort=True):
            for criterion, floor in (("no loss", b["headline_score"]),
                                     ("within 1 point", b["headline_score"] - ONE_POINT)):
                best = fastest(rows, floor)
                if best is not None:
                    picked.append(best.to_dict() | {"criterion": criterion})
    cols = list(methods.columns) + ["criterion"]
    return pd.DataFrame(picked, columns=cols).drop(columns="_time").reset_index(drop=True)


def table1(df: pd.DataFrame, baseline_pair: str | None = None) -> str:
    """BiLD Table 1 as Markdown: one column per group, rows vanilla large then each series' picks."""
    base = with_speedup(baseline_rows(df, baseline_pair), baseline_pair)
    picks = table1_frame(df, baseline_pair)
    keys = [tuple(k) for k in base[GROUP].itertuples(index=False)]
    header = ["run"] + [f"{t} / {d} / {p} ({m})"
                        for (t, d, p), m in zip(keys, base["headline_metric"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| vanilla large | " + " | ".join(
        f"{s:.2f}, 1.00x" for s in base["headline_score"]) + " |")
    for series in sorted(_methods(df, baseline_pair)["series"].unique()):
        for criterion in ("no loss", "within 1 point"):
            cells = []
            for key in keys:
                hit = picks[(picks["series"] == series) & (picks["criterion"] == criterion)
                            & (picks[GROUP] == list(key)).all(axis=1)]
                if len(hit):
                    r = hit.iloc[0]
                    cells.append(f"{r['headline_score']:.2f}, {r['speedup']:.2f}x, {_thresholds(r)}"
                                 .rstrip(", "))
                else:
                    cells.append("—")
            lines.append(f"| {series}, {criterion} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: headline score, speedup over vanilla large (same task, device, dtype), "
                 f"(rollback, fallback) thresholds. \"within 1 point\" = score ≥ baseline − {_fmt(ONE_POINT)}.")
    return "\n".join(lines) + "\n"


def _draw_group(ax, methods: pd.DataFrame, base: pd.Series, small: pd.Series | None,
                series_marker: dict, rb_color: dict) -> None:
    score = base["headline_score"]
    ax.axhline(score, color="0.3", lw=1, zorder=1)
    ax.axhline(score - ONE_POINT, color="0.3", lw=1, ls="--", zorder=1)
    for series, rows in methods.groupby("series", sort=True):
        for rb, pts in rows.groupby(rows["rollback_threshold"].fillna(-1.0), sort=True):
            pts = pts.sort_values("normalized_latency")
            color = rb_color.get(rb, "0.5")
            # A thin line through one rollback threshold shows the fallback sweep as a curve.
            ax.plot(pts["normalized_latency"], pts["headline_score"], color=color, lw=0.6,
                    alpha=0.6, zorder=2)
            ax.scatter(pts["normalized_latency"], pts["headline_score"], color=color,
                       marker=series_marker[series], s=30, edgecolor="k", lw=0.4, zorder=3)
            for _, p in pts.iterrows():
                if not pd.isna(p["fallback_threshold"]):
                    ax.annotate(_fmt(p["fallback_threshold"]), (p["normalized_latency"],
                                p["headline_score"]), xytext=(3, 3), textcoords="offset points",
                                fontsize=6, color="0.25")
    ax.scatter([1.0], [score], marker="X", s=90, color="k", zorder=4)
    # The y range follows BiLD and the quality lines; a far-worse small model would squash them.
    ys = pd.concat([methods["headline_score"], pd.Series([score, score - ONE_POINT])])
    pad = 0.08 * max(ys.max() - ys.min(), ONE_POINT)
    lo, hi = ys.min() - pad, ys.max() + pad
    ax.set_ylim(lo, hi)
    if small is not None:
        y = small["headline_score"]
        off_scale = y < lo
        ax.scatter([small["normalized_latency"]], [max(y, lo + pad / 2)], marker="*", s=130,
                   color="tab:red", edgecolor="k", lw=0.4, zorder=4, clip_on=False)
        if off_scale:
            ax.annotate(f"{y:.2f} (off scale)", (small["normalized_latency"], lo + pad / 2),
                        xytext=(8, -3), textcoords="offset points", fontsize=7, color="tab:red")
    ax.set_xlabel("latency / vanilla large latency")
    ax.set_ylabel(str(base["headline_metric"]))
    ax.set_title("{} / {} / {}".format(*base[GROUP]), fontsize=10)
    ax.grid(alpha=0.3)


def _legend_handles(series_marker: dict, rb_color: dict, has_small: bool) -> list:
    def h(label, **kw):
        return mlines.Line2D([], [], ls="none", label=label, **kw)

    handles = [h("vanilla large", marker="X", color="k", ms=9)]
    if has_small:
        handles.append(h("vanilla small", marker="*", color="tab:red", mec="k", ms=11))
    handles += [h(s, marker=m, color="w", mec="k", ms=7) for s, m in series_marker.items()]
    handles += [h(f"rollback {_fmt(rb)}" if rb >= 0 else "no rollback", marker="o", color=c,
                  mec="k", ms=7) for rb, c in rb_color.items()]
    handles += [mlines.Line2D([], [], color="0.3", label="vanilla large quality"),
                mlines.Line2D([], [], color="0.3", ls="--", label=f"−{_fmt(ONE_POINT)} point")]
    return handles


def figure4(df: pd.DataFrame, baseline_pair: str | None = None) -> Figure:
    """BiLD Figure 4: per group, score vs normalised latency; labels next to points = fallback."""
    base = with_speedup(baseline_rows(df, baseline_pair), baseline_pair)
    full = _normalise(with_speedup(df, baseline_pair))
    small = _vanilla(full, "small", baseline_pair)
    methods = _methods(df, baseline_pair)
    series_marker = {s: _MARKERS[i % len(_MARKERS)]
                     for i, s in enumerate(sorted(methods["series"].unique()))}
    rbs = sorted(methods["rollback_threshold"].fillna(-1.0).unique())
    cmap = mcolors.ListedColormap(["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e",
                                   "#e6ab02", "#a6761d", "#1f78b4"])
    rb_color = {rb: cmap(i % cmap.N) if rb >= 0 else "0.6" for i, rb in enumerate(rbs)}

    n = len(base)
    ncols = min(n, 2)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(5.2 * ncols + 1.8, 4.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, (_, b) in zip(axes, base.iterrows()):
        key = list(b[GROUP])
        s = small[(small[GROUP] == key).all(axis=1)]
        _draw_group(ax, methods[(methods[GROUP] == key).all(axis=1)], b,
                    s.iloc[0] if len(s) else None, series_marker, rb_color)
    for ax in axes[n:]:
        ax.set_visible(False)
    # One shared legend outside the axes, so it never hides a point.
    fig.legend(handles=_legend_handles(series_marker, rb_color, len(small) > 0),
               loc="outside right upper", fontsize=8, title="labels at points: fallback",
               title_fontsize=8)
    return fig


# ------------------------------------------------------------------------- baselines (Tables 3-4)
_BASELINE_POLICIES = ("speculative", "hf_assisted", "calm")


def has_baselines(df: pd.DataFrame) -> bool:
    return bool(df["policy"].isin(_BASELINE_POLICIES).any())


def pareto(rows: pd.DataFrame) -> pd.DataFrame:
    """The runs no other run beats on both latency and score, sorted by latency."""
    rows = rows.sort_values(["normalized_latency", "headline_score"], ascending=[True, False])
    return rows[rows["headline_score"] >= rows["headline_score"].cummax()]


def baselines_figure(df: pd.DataFrame, baseline_pair: str | None = None) -> Figure:
    """BiLD, speculative, CALM and BiLD early exit on one quality-vs-normalised-latency plot per group
    (BiLD paper Figures 4, 6 and 7 on the same axes); every vanilla row is an x labelled with its pair."""
    base = with_speedup(baseline_rows(df, baseline_pair), baseline_pair)
    full = _normalise(with_speedup(df, baseline_pair))
    methods = _methods(df, baseline_pair)
    n = len(base)
    fig = Figure(figsize=(7.5 * n, 5.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False).ravel())
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4"]
    colors = {s: palette[i % len(palette)] for i, s in enumerate(sorted(methods["series"].unique()))}
    for ax, (_, b) in zip(axes, base.iterrows()):
        key = list(b[GROUP])
        score = b["headline_score"]
        ax.axhline(score, color="0.3", lw=1)
        ax.axhline(score - ONE_POINT, color="0.3", lw=1, ls="--")
        rows = methods[(methods[GROUP] == key).all(axis=1)]
        for series, pts in rows.groupby("series", sort=True):
            front = pareto(pts)
            ax.scatter(pts["normalized_latency"], pts["headline_score"], color=colors[series], s=10, alpha=0.35)
            ax.plot(front["normalized_latency"], front["headline_score"], "-o", color=colors[series], ms=4, lw=1,
                    label=f"{series} (Pareto front of {len(pts)} runs)")
        vanilla = full[(full["policy"] == "vanilla") & (full[GROUP] == key).all(axis=1)]
        for _, v in vanilla.sort_values("_time").groupby(["pair", "which"]).tail(1).iterrows():
            ax.scatter([v["normalized_latency"]], [v["headline_score"]], marker="X", s=60, color="k", zorder=4)
            ax.annotate(f"{v['pair']} {v['which']}", (v["normalized_latency"], v["headline_score"]), xytext=(4, -9),
                        textcoords="offset points", fontsize=6)
        ax.set_xlabel(f"latency / vanilla large latency ({b['pair']})")
        ax.set_ylabel(str(b["headline_metric"]))
        ax.set_title("{} / {} / {}".format(*b[GROUP]), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def table3_frame(df: pd.DataFrame, baseline_pair: str | None = None, bild_series: str = "bild",
                 spec_series: str = "speculative") -> pd.DataFrame:
    """BiLD Table 3 as data, per group: vanilla large, the fastest speculative run, the best-scoring BiLD
    run at least as fast (match latency) and the fastest BiLD run scoring at least as well (match quality)."""
    base = with_speedup(baseline_rows(df, baseline_pair), baseline_pair)
    methods = _methods(df, baseline_pair)
    picked = []
    for _, b in base.iterrows():
        rows = methods[(methods[GROUP] == b[GROUP].values).all(axis=1)]
        spec, bild = rows[rows["series"] == spec_series], rows[rows["series"] == bild_series]
        picked.append(b.to_dict() | {"row": "vanilla large"})
        if not len(spec):
            continue
        s = spec.sort_values(["speedup", "headline_score"], ascending=False).iloc[0]
        picked.append(s.to_dict() | {"row": f"{spec_series} (fastest window)"})
        faster = bild[bild["speedup"] >= s["speedup"]]
        if len(faster):
            best = faster.sort_values(["headline_score", "speedup"], ascending=False).iloc[0]
            picked.append(best.to_dict() | {"row": f"{bild_series} (match latency)"})
        best = fastest(bild, s["headline_score"])
        if best is not None:
            picked.append(best.to_dict() | {"row": f"{bild_series} (match quality)"})
    return pd.DataFrame(picked)


def _settings(r: pd.Series) -> str:
    if r["policy"] == "bild":
        steps = pd.to_numeric(r.get("max_small_steps"), errors="coerce")
        default = pd.isna(steps) or steps == PolicyConfig.max_small_steps  # named only where a run changed it
        return f"(rollback, fallback) = {_thresholds(r)}" + ("" if default else f", drafts of at most {int(steps)}")
    if r["policy"] in ("speculative", "hf_assisted"):
        return f"window {int(r['num_draft_tokens'])}"
    return ""


def table3(df: pd.DataFrame, baseline_pair: str | None = None) -> str:
    """BiLD Table 3 (matched latency / matched quality against speculative) with Table 4's columns
    (fallback and rollback % against speculative's rejection %), as Markdown."""
    t = table3_frame(df, baseline_pair)
    lines = ["| group | run | score | speedup | % fallback | % rollback (rejection) | settings |",
             "|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        group = "{} / {} / {}".format(*r[GROUP])
        if r["row"] == "vanilla large":
            lines.append(f"| {group} | vanilla large | {r['headline_score']:.2f} | 1.00x | — | — | |")
            continue
        lines.append(f"| {group} | {r['row']} | {r['headline_score']:.2f} | {r['speedup']:.2f}x | "
                     f"{100 * r['fallback_rate']:.2f}% | {100 * r['rollback_rate']:.2f}% | {_settings(r)} |")
    lines += ["", "Speedup over the vanilla-large run of the same task, device and dtype"
              + (f" (pair {baseline_pair})" if baseline_pair else "") + ". % fallback: hand-overs to the large "
              "model per small-model step (speculative: one per drafted window); % rollback: small tokens discarded "
              "per small token proposed (speculative: rejected draft tokens)."]
    return "\n".join(lines) + "\n"


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Writes `<stem>.png` and `<stem>.pdf`; returns both paths."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # No creation date or software version in the files: the same CSV gives byte-identical figures.
    for path, metadata in zip(paths, ({"Software": None}, {"CreationDate": None, "Producer": None, "Creator": None})):
        fig.savefig(path, dpi=150, metadata=metadata)
    return paths


def save_table(text: str, path: Path) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_results(csv_path: str | Path) -> pd.DataFrame:
    """A results CSV with at least one run, or one line saying what is wrong with it."""
    from bildexp import BildexpError

    try:
        df = pd.read_csv(csv_path)
    except pd.errors.EmptyDataError:
        raise BildexpError(f"{csv_path} is empty: it holds no runs (bildexp run writes them)") from None
    if df.empty or "policy" not in df.columns:
        raise BildexpError(f"{csv_path} holds no runs (bildexp run writes them)")
    # A row holds only its own policy's knobs, so a CSV of one policy lacks the others' columns (`which`, ...).
    from bildexp.config import POLICY_FIELDS, SAMPLING_FIELDS

    knobs = dict.fromkeys(k for fields in POLICY_FIELDS.values() for k in fields)
    missing = [k for k in [*knobs, *SAMPLING_FIELDS, "sampling"] if k not in df.columns]
    return df.reindex(columns=[*df.columns, *missing]) if missing else df


def make_all(csv_path: str | Path, out_dir: str | Path, baseline_pair: str | None = None) -> list[Path]:
    """Reads a results CSV; writes into out_dir <stem>_figure4.png/.pdf and <stem>_table1.md (BiLD runs);
    <stem>_baselines.png/.pdf and <stem>_table3.md when it holds speculative/hf_assisted/calm runs; and
    <stem>_ppd_table1.md, <stem>_ppd_positions.md, <stem>_ppd_tradeoff.png/.pdf for ppd_match runs."""
    from bildexp import ppd

    csv_path, out_dir = Path(csv_path), Path(out_dir)
    df = read_results(csv_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / csv_path.stem
    paths: list[Path] = []
    if (df["policy"] != "ppd_match").any():
        paths += save_figure(figure4(df, baseline_pair), Path(f"{stem}_figure4"))
        paths.append(save_table(table1(df, baseline_pair), Path(f"{stem}_table1.md")))
    if has_baselines(df):
        paths += save_figure(baselines_figure(df, baseline_pair), Path(f"{stem}_baselines"))
        paths.append(save_table(table3(df, baseline_pair), Path(f"{stem}_table3.md")))
    if (df["policy"] == "ppd_match").any():
        paths.append(save_table(ppd.table1(df), Path(f"{stem}_ppd_table1.md")))
        paths.append(save_table(ppd.position_tables(df), Path(f"{stem}_ppd_positions.md")))
        paths += save_figure(ppd.trade_off_figure(ppd.half_depth_points(df)), Path(f"{stem}_ppd_tradeoff"))
    return paths
