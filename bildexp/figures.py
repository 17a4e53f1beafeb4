"""`bildexp figures`: every paper artifact (docs/REPRODUCTION.md) from the results CSVs alone.

Each artifact reads the CSV its experiment config writes (conf/experiment/<artifact>/*.yaml) and writes
figures as PNG and PDF and tables as Markdown and LaTeX, the paper's numbers (bildexp/paper/) beside ours.
An artifact whose CSV is missing is skipped with a note, so a partial reproduction still gets its figures.
Figure files carry no timestamps: the same CSVs give byte-identical files.
"""

from __future__ import annotations

import html
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bildexp import PROJECT_ROOT, BildexpError, plots, ppd

PAPER_DIR = PROJECT_ROOT / "bildexp" / "paper"
# Our settings beside the paper's rows: Table 1's "minimal degradation" row is our fastest run with no
# loss, its "within ~1 point" row our fastest run within one point (plots.table1_frame's criteria).
CRITERION = {"matched_quality": "no loss", "matched_latency": "within 1 point"}
SERIES = {"bild_unaligned": "bild", "bild_aligned": "bild, aligned"}


def paper_table(name: str) -> pd.DataFrame:
    """One of the papers' tables as printed (bildexp/paper/<name>.csv)."""
    return pd.read_csv(PAPER_DIR / f"{name}.csv", dtype={"setting": "string"}).fillna({"setting": ""})


# --- writing -------------------------------------------------------------------------------------------


def _cell(x: object) -> str:
    if isinstance(x, float):
        return "—" if np.isnan(x) else f"{x:.2f}"
    return "—" if x is None or x is pd.NA else str(x)


def markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex(df: pd.DataFrame, caption: str) -> str:
    body = df.map(_cell).to_latex(index=False, escape=True, column_format="l" * len(df.columns))
    return f"% {caption}\n" + body


def write_table(df: pd.DataFrame, stem: Path, title: str, note: str = "") -> list[Path]:
    """<stem>.md (title, table, note) and <stem>.tex (a tabular with the title as a comment)."""
    md, tex = stem.with_suffix(".md"), stem.with_suffix(".tex")
    md.write_text(f"### {title}\n\n" + markdown(df) + (f"\n{note}\n" if note else ""), encoding="utf-8")
    tex.write_text(latex(df, title), encoding="utf-8")
    return [md, tex]


# --- the artifacts -------------------------------------------------------------------------------------


def _score_speed(q: float, s: float) -> str:
    return f"{q:.2f}, {s:.2f}x"


def _base(df: pd.DataFrame, pair: str | None = None, sampling: bool = False) -> pd.Series:
    """The newest vanilla-large row (of `pair`; greedy, or sampled)."""
    rows = plots._vanilla(df, "large", pair, sampling)
    if rows.empty:
        raise plots.MissingBaselineError(f"no vanilla-large run{' of ' + pair if pair else ''} in the CSV")
    return rows.sort_values("time").iloc[-1]


_VARIANTS = ("aligned", "early_exit", "calm")


def _main_pair(df: pd.DataFrame) -> str | None:
    """The pair every speedup of one task is against: its vanilla-large pair that is not a variant of another
    (aligned, early exit, CALM); None when there is no single one (several tasks: plots picks per group)."""
    rows = df[(df["policy"] == "vanilla") & (df["which"].astype("string") == "large")]
    plain = sorted({p for p in rows["pair"].astype(str) if not any(v in p for v in _VARIANTS)})
    return plain[0] if len(plain) == 1 else None


def _tasks(df: pd.DataFrame):
    """(task, its rows, its main pair) for every task of a CSV, in name order."""
    for task, rows in df.groupby("task", sort=True):
        yield task, rows, _main_pair(rows)


def _against(rows: pd.DataFrame, pool: pd.DataFrame, pair: str | None = None, sampling: bool = False) -> pd.DataFrame:
    """rows with speedups against the baseline the baseline rule picks for each among pool's rows (plots)."""
    return plots.against_baselines(rows, pool, pair, sampling)


def bild_table1(df: pd.DataFrame) -> pd.DataFrame:
    """BiLD Table 1: the paper's four tasks beside each of our tasks, per method and setting."""
    paper = paper_table("bild_table1")
    ours = []
    for task, rows, main in _tasks(df):
        ours.append((task, _base(rows, main), plots.table1_frame(rows, main)))
    out = []
    for (method, setting), _ in paper.groupby(["method", "setting"], sort=False):
        row = {"method": method, "setting": setting or "—"}
        for _, p in paper[(paper["method"] == method) & (paper["setting"] == setting)].iterrows():
            row[f"paper {p['task']} ({p['metric']})"] = _score_speed(p["quality"], p["speedup"])
        for task, base, picks in ours:
            if method == "vanilla_large":
                cell = f"{base['headline_score']:.2f}, 1.00x"
            else:
                hit = picks[(picks["series"] == SERIES[method]) & (picks["criterion"] == CRITERION[setting])]
                cell = "—" if hit.empty else (_score_speed(hit.iloc[0]["headline_score"], hit.iloc[0]["speedup"])
                                              + f", {plots._thresholds(hit.iloc[0])}")
            row[f"ours {task} ({base['headline_metric']})"] = cell
        out.append(row)
    return pd.DataFrame(out)


def _panels(n: int, width: float = 5.5, height: float = 4.0):
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n, squeeze=False).ravel())


def figure2(df: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """BiLD Figure 2: quality against the share of tokens the large model provided (policy=oracle), per task."""
    tasks = list(_tasks(df))
    fig, axes = _panels(len(tasks))
    tables = []
    for ax, (task, rows, main) in zip(axes, tasks):
        oracle = rows[rows["policy"] == "oracle"].sort_values("replace_threshold")
        large = _base(rows, main)
        small = plots._vanilla(rows, "small", main)
        ax.plot(100 * oracle["large_token_share"], oracle["headline_score"], "-o", color="#1f78b4",
                label="small + oracle large")
        ax.axhline(large["headline_score"], color="0.2", lw=1, label="vanilla large")
        if len(small):
            ax.axhline(small.iloc[-1]["headline_score"], color="0.2", lw=1, ls=":", label="vanilla small")
        ax.set_xlabel("tokens provided by the large model (%)")
        ax.set_ylabel(str(large["headline_metric"]))
        ax.set_title(f"{task}: {large['pair']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        tables.append(pd.DataFrame({
            "task": task,
            "replace threshold": oracle["replace_threshold"].map(lambda x: f"{x:g}"),
            "large-model tokens (%)": 100 * oracle["large_token_share"],
            "score": oracle["headline_score"],
            "score - vanilla large": oracle["headline_score"] - large["headline_score"],
        }))
    return fig, pd.concat(tables, ignore_index=True)


def _curves(ax, rows: pd.DataFrame, label_of, color_of) -> None:
    for label, pts in rows.groupby(label_of, sort=True):
        front = plots.pareto(pts)
        ax.scatter(pts["normalized_latency"], pts["headline_score"], color=color_of(label), s=10, alpha=0.35)
        ax.plot(front["normalized_latency"], front["headline_score"], "-o", ms=4, lw=1, color=color_of(label),
                label=f"{label} (Pareto front of {len(pts)})")


def _reference_lines(ax, base: pd.Series) -> None:
    ax.axhline(base["headline_score"], color="0.3", lw=1)
    ax.axhline(base["headline_score"] - plots.ONE_POINT, color="0.3", lw=1, ls="--")
    ax.set_ylabel(str(base["headline_metric"]))
    ax.grid(alpha=0.3)


def _ablation(row: pd.Series) -> str:
    if np.isinf(float(row["rollback_threshold"])):
        return "BiLD without rollback"
    if float(row["fallback_threshold"]) == 0.0:
        return "BiLD without fallback"
    return "BiLD"


def figure5(df: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """BiLD Figure 5: full BiLD against no rollback and no fallback (fixed hand-over after 3-10 steps), per task."""
    colors = {"BiLD": "#1f78b4", "BiLD without rollback": "#d95f02", "BiLD without fallback": "#7570b3"}
    tasks = list(_tasks(df))
    fig, axes = _panels(len(tasks), 6.0, 4.2)
    tables = []
    for ax, (task, rows, main) in zip(axes, tasks):
        base = _base(rows, main)
        bild = _against(rows[rows["policy"] == "bild"], rows, main)
        bild["series"] = bild.apply(_ablation, axis=1)
        _reference_lines(ax, base)
        _curves(ax, bild, "series", colors.get)
        ax.set_xlabel(f"latency / vanilla large ({base['pair']})")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        tables.append(_best_by_series(bild, base).assign(task=task))
    table = pd.concat(tables, ignore_index=True)
    return fig, table[["task", *[c for c in table.columns if c != "task"]]]


def _best_by_series(rows: pd.DataFrame, base: pd.Series) -> pd.DataFrame:
    out = []
    for series, pts in rows.groupby("series", sort=True):
        for name, floor in (("no loss", base["headline_score"]), ("within 1 point", base["headline_score"] - plots.ONE_POINT)):
            best = plots.fastest(pts, floor)
            out.append({"series": series, "criterion": name,
                        "score": np.nan if best is None else best["headline_score"],
                        "speedup": np.nan if best is None else best["speedup"],
                        "settings": "—" if best is None else _setting_text(best)})
    return pd.DataFrame(out)


def _setting_text(r: pd.Series) -> str:
    if r["policy"] == "bild":
        text = f"rollback {float(r['rollback_threshold']):g}, fallback {float(r['fallback_threshold']):g}"
        return text + (f", hand over after {int(r['max_small_steps'])}" if float(r["fallback_threshold"]) == 0 else "")
    if r["policy"] == "calm":
        return f"lambda {float(r['exit_threshold']):g}, t {float(r['exit_decay']):g}"
    return plots._settings(r)


def figures6_7(df: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """BiLD Figures 6-7: BiLD early exit (BiLD on an early-exit pair) and CALM, each against its own
    fine-tuned model's vanilla decoding, per task."""
    facts = {"bild": "IWSLT 1.60x, WMT 1.74x within 1 BLEU (Figure 6)",
             "calm": "BiLD up to ~2 BLEU better at ~1.5x (Figure 7)"}
    tasks = [(task, rows) for task, rows, _ in _tasks(df) if (rows["policy"] == "calm").any()
             or rows["pair"].astype(str).str.contains("early_exit").any()]
    fig, axes = _panels(max(len(tasks), 1), 6.0, 4.2)
    table = []
    for ax, (task, rows) in zip(axes, tasks):
        ax.axhline(0.0, color="0.3", lw=1)
        ax.axhline(-plots.ONE_POINT, color="0.3", lw=1, ls="--")
        early = rows[(rows["policy"] == "bild") & rows["pair"].astype(str).str.contains("early_exit")]
        calm = rows[rows["policy"] == "calm"]
        for policy, method, color, label in (("bild", early, "#1f78b4", "BiLD early exit"), ("calm", calm, "#d95f02", "CALM")):
            for pair, pts in method.groupby("pair", sort=True):
                base = _base(rows, pair)
                pts = _against(pts, rows, pair)
                pts = pts.assign(headline_score=pts["quality_delta"])
                front = plots.pareto(pts)
                ax.scatter(pts["normalized_latency"], pts["headline_score"], color=color, s=10, alpha=0.35)
                ax.plot(front["normalized_latency"], front["headline_score"], "-o", ms=4, lw=1, color=color,
                        label=f"{label} (vanilla {base['headline_score']:.2f})")
                for name, floor in (("no loss", 0.0), ("within 1 point", -plots.ONE_POINT)):
                    best = plots.fastest(pts, floor)
                    table.append({"task": task, "method": label, "criterion": name,
                                  "score - own vanilla": np.nan if best is None else best["headline_score"],
                                  "speedup": np.nan if best is None else best["speedup"],
                                  "settings": "—" if best is None else _setting_text(best), "paper": facts[policy]})
        ax.set_xlabel("latency / the same model's vanilla latency")
        ax.set_ylabel("score - the same model's vanilla score")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return fig, pd.DataFrame(table)


def bild_tables3_4(df: pd.DataFrame) -> pd.DataFrame:
    """BiLD Tables 3-4: matched latency / matched quality against speculative, with the paper's rows."""
    ours = pd.concat([plots.table3_frame(rows[~rows["pair"].astype(str).str.contains("early_exit|calm")], main)
                      for _, rows, main in _tasks(df)], ignore_index=True)
    return pd.DataFrame(_table3_rows(ours) + paper_tables3_4())


def _table3_rows(frame: pd.DataFrame) -> list[dict]:
    """plots.table3_frame's rows in the columns of `bild_tables3_4`."""
    rows = []
    for _, r in frame.iterrows():
        vanilla = r["row"] == "vanilla large"
        unseen = vanilla or r["policy"] == "hf_assisted"  # generate() does not say which tokens were drafted
        rows.append({"source": f"ours {r['task']}", "row": r["row"], "score": r["headline_score"],
                     "speedup": 1.0 if vanilla else r["speedup"],
                     "% fallback": np.nan if unseen else 100 * r["fallback_rate"],
                     "% rollback / rejection": np.nan if unseen else 100 * r["rollback_rate"],
                     "settings": "" if vanilla else plots._settings(r)})
    return rows


def paper_tables3_4(tasks: set[str] | None = None) -> list[dict]:
    """The paper's Tables 3-4 as rows of `bild_tables3_4` (of `tasks` only, when given)."""
    rows = []
    t3, t4 = paper_table("bild_table3"), paper_table("bild_table4")
    if tasks is not None:
        t3, t4 = t3[t3["task"].isin(tasks)], t4[t4["task"].isin(tasks)]
    for _, p in t3.iterrows():
        match = t4[(t4["task"] == p["task"]) & (t4["method"] == p["method"]) & (t4["quality"] == p["quality"])]
        m = match.iloc[0] if len(match) else None
        rows.append({"source": f"paper {p['task']}", "row": p["paper_label"], "score": p["quality"],
                     "speedup": p["speedup"], "% fallback": np.nan if m is None else m["fallback_pct"],
                     "% rollback / rejection": np.nan if m is None else m["rollback_rejection_pct"], "settings": ""})
    for _, p in t4[t4["setting"] == "better_quality"].iterrows():  # Table 4's BiLD rows (= Table 1's)
        rows.append({"source": f"paper {p['task']} (Table 4)", "row": p["paper_label"], "score": p["quality"],
                     "speedup": p["speedup"], "% fallback": p["fallback_pct"],
                     "% rollback / rejection": p["rollback_pct"], "settings": ""})
    return rows


def _baseline_text(r: pd.Series) -> str:
    """Which vanilla-large run a row's speedup divides by (plots' baseline rule): 'interleaved', or the rule and
    the baseline's finishing time (UTC)."""
    if r["baseline_rule"] == "interleaved":
        return "interleaved"
    return f"{r['baseline_rule']}, {pd.Timestamp(r['baseline_time']).strftime('%m-%d %H:%M')}"


def phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every run of one task's sweep against its vanilla-large run: score, end-to-end speedup, and the two phases
    apart (the prompt passes, `prefill_ms`, and the rest per output token, `decode_ms_per_token`)."""
    out = []
    for task, rows, main in _tasks(df):
        base = _base(rows, main)
        # Vanilla large timed again after the policies (runner.repeat): the speedups against the first run beside
        greedy = plots._vanilla_runs(rows, "large", main)
        first = greedy.sort_values("time").iloc[0] if len(greedy) > 1 else None
        keys = ["policy", "sampling", "which", "fallback_threshold", "rollback_threshold", "num_draft_tokens"]
        runs = _against(rows, rows, main)
        runs = runs.sort_values([k for k in keys if k in runs])
        for _, r in runs.iterrows():
            sampled = ", sampled" if r["sampling"] else ""
            name = f"vanilla {r['which']}{sampled}" if r["policy"] == "vanilla" else f"{r['policy']}{sampled}"
            quant = r.get(f"{r['which']}_quant", "none") if r["policy"] == "vanilla" else "none"
            if isinstance(quant, str) and quant != "none":
                name += f" ({quant})"  # a quantized model decoding alone
            if main is not None and r["pair"] != main:
                name += f", {r['pair']}"  # another pair's run (e.g. an aligned draft) against the main pair's baseline
            if pd.notna(r.get("repeat", np.nan)) and int(r["repeat"]):
                name += f", repeat {int(r['repeat'])}"  # the same setting timed again (e.g. after the policies)
            accepted = r.get("acceptance_rate", np.nan)
            out.append({
                "task": task, "run": name, "settings": plots._settings(r), base["headline_metric"]: r["headline_score"],
                "delta": r["quality_delta"], "latency ms": r["latency_ms_mean"], "speedup": r["speedup"],
                "baseline": _baseline_text(r),
                **({} if first is None else {"speedup vs first": first["latency_ms_mean"] / r["latency_ms_mean"]}),
                "prefill ms": r.get("prefill_ms", np.nan), "decode ms/token": r.get("decode_ms_per_token", np.nan),
                "decode speedup": base.get("decode_ms_per_token", np.nan) / r.get("decode_ms_per_token", np.nan),
                **({} if first is None else {
                    "decode speedup vs first": first.get("decode_ms_per_token", np.nan) / r.get("decode_ms_per_token", np.nan)}),
                "tokens": r["output_tokens_mean"],
                "% large tokens": np.nan if r["policy"] == "hf_assisted" else 100 * r["large_token_share"],
                "% fallback": 100 * r["fallback_rate"] if r["policy"] == "bild" else np.nan,
                "% rollback": 100 * r["rollback_rate"] if r["policy"] == "bild" else np.nan,
                "% accepted": 100 * accepted if pd.notna(accepted) else np.nan,
            })
    return pd.DataFrame(out)


def fronts_table(df: pd.DataFrame) -> pd.DataFrame:
    """BiLD Tables 3-4 for one testbed sweep: against each lossless baseline (speculative, hf_assisted; greedy
    runs), its fastest window, the best-scoring BiLD run at least as fast and the fastest BiLD run scoring at least
    as well; the paper's Tables 3-4 rows of the same task beside them."""
    greedy = df[~plots._as_bool(df["sampling"])] if "sampling" in df else df
    frames = []
    for i, series in enumerate(("speculative", "hf_assisted")):
        frame = plots.table3_frame(greedy, _main_pair(greedy), spec_series=series)
        frame["row"] = frame["row"].str.replace("bild (", f"bild vs {series} (", regex=False)
        frames.append(frame if i == 0 else frame[frame["row"] != "vanilla large"])
    return pd.DataFrame(_table3_rows(pd.concat(frames, ignore_index=True)) + paper_tables3_4(set(df["task"].astype(str))))


def bild_table5(df: pd.DataFrame) -> pd.DataFrame:
    """BiLD Table 5: nucleus sampling (p = 0.8), against the sampled vanilla-large run, per task."""
    paper = paper_table("bild_table5")
    settings = ["vanilla large", "improved_quality", "matched_quality", "matched_latency"]
    out = {s: {"setting": s} for s in settings}
    for task, rows, main in _tasks(df):
        base = _base(rows, main, sampling=True)
        bild = _against(plots._normalise(rows).query("policy == 'bild' and sampling"), rows, main, sampling=True)
        picks = {"vanilla large": base.to_dict() | {"quality_delta": 0.0, "speedup": 1.0, "policy": "vanilla"},
                 # only a run that scores above the sampled large model improves quality (else "—", not a loss so labelled)
                 "improved_quality": None if (better := bild[bild["quality_delta"] > 0]).empty
                 else better.sort_values(["headline_score", "speedup"], ascending=False).iloc[0],
                 "matched_quality": plots.fastest(bild, base["headline_score"]),
                 "matched_latency": plots.fastest(bild, base["headline_score"] - plots.ONE_POINT)}
        for setting, r in picks.items():
            out[setting][f"ours {task}"] = "—" if r is None else (
                f"{r['headline_score']:.2f} ({r['quality_delta']:+.2f}), {r['speedup']:.2f}x"
                + ("" if setting == "vanilla large" else f", {_setting_text(pd.Series(r))}"))
    for setting, row in out.items():
        key = "" if setting == "vanilla large" else setting
        for _, p in paper[paper["setting"] == key].iterrows():
            delta = f" ({p['delta']})" if isinstance(p["delta"], str) else ""
            row[f"paper {p['task']}"] = f"{p['quality']:.2f}{delta}, {p['speedup']:.2f}x"
    return pd.DataFrame(list(out.values()))


def figure8(df: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """BiLD Figure 8: FLOPs, memory traffic and arithmetic intensity normalised by vanilla large, per task:
    bars for the fastest BiLD run at vanilla quality (else the best-scoring one), a table for every run."""
    tasks = list(_tasks(df))
    fig, axes = _panels(len(tasks), 5.5, 3.8)
    tables = []
    names = ["FLOPs", "memory ops", "arithmetic\nintensity", "speedup"]
    for ax, (task, rows, main) in zip(axes, tasks):
        base = _base(rows, main)
        bild = _against(rows[rows["policy"] == "bild"].dropna(subset=["flops"]), rows, main)
        tables.append(pd.DataFrame({
            "task": task,
            "settings": bild.apply(_setting_text, axis=1),
            "score - vanilla": bild["quality_delta"],
            "FLOPs": bild["flops"] / base["flops"],
            "memory bytes": bild["memory_bytes"] / base["memory_bytes"],
            "arithmetic intensity": bild["arithmetic_intensity"] / base["arithmetic_intensity"],
            "speedup": bild["speedup"],
        }).sort_values("speedup", ascending=False))
        if bild.empty:
            continue
        pick = plots.fastest(bild, base["headline_score"])
        if pick is None:  # no run at vanilla quality: the best-scoring one
            pick = bild.sort_values("headline_score", ascending=False).iloc[0]
        bars = [pick["flops"] / base["flops"], pick["memory_bytes"] / base["memory_bytes"],
                pick["arithmetic_intensity"] / base["arithmetic_intensity"], pick["speedup"]]
        ax.bar(names, bars, color=["#1b9e77", "#d95f02", "#7570b3", "#66a61e"])
        ax.axhline(1.0, color="0.2", lw=1)
        for i, v in enumerate(bars):
            ax.annotate(f"{v:.2f}x", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("BiLD / vanilla large")
        ax.set_title(f"{task}, {base['pair']}: {_setting_text(pick)} ({pick['quality_delta']:+.2f})", fontsize=9)
    return fig, pd.concat(tables, ignore_index=True)


def fig9_tokens(generations: Path, config: Path, limit: int = 4) -> list[dict]:
    """The first examples of a BiLD run as Figure 9 needs them: ids, output tokens, who produced each, and
    the setting. Model outputs only: no source or reference text (the repository holds no ../shared data)."""
    cfg = json.loads(config.read_text())
    setting = {"pair": cfg["pair"]["name"], "tokenizer": cfg["pair"]["tokenizer"] or cfg["pair"]["large"],
               "fallback_threshold": cfg["policy"]["fallback_threshold"], "rollback_threshold": cfg["policy"]["rollback_threshold"]}
    records = [json.loads(line) for line in generations.read_text().splitlines()[:limit]]
    return [{"id": r["id"], "tokens": r["tokens"], "provenance": r["provenance"], **setting} for r in records]


def figure9(records: list[dict]) -> tuple[str, str]:
    """BiLD Figure 9: example outputs with the large model's tokens highlighted → (HTML, LaTeX)."""
    from bildexp.models import load_tokenizer

    first = records[0]
    tokenizer = load_tokenizer(first["tokenizer"])
    html_rows, tex_rows = [], []
    for r in records:
        pieces, prev = [], ""
        for i, source in enumerate(r["provenance"]):  # the text each token adds, and who produced it
            text = tokenizer.decode(r["tokens"][: i + 1], skip_special_tokens=True)
            if text != prev:
                pieces.append((text[len(prev):], source))
            prev = text
        html_rows.append(f"<p><b>{html.escape(str(r['id']))}:</b> " + "".join(
            f'<span style="background:#9be39b">{html.escape(t)}</span>' if s == "L" else html.escape(t)
            for t, s in pieces) + "</p>")
        tex_rows.append(r"\textbf{" + _tex(str(r["id"])) + ":} " + "".join(
            r"\colorbox{green!30}{" + _tex(t) + "}" if s == "L" and t.strip() else _tex(t) for t, s in pieces) + r" \\[4pt]")
    title = (f"BiLD Figure 9: {first['pair']}, fallback {first['fallback_threshold']:g}, rollback "
             f"{first['rollback_threshold']:g}; highlighted tokens come from the large model")
    page = f"<html><body><h3>{html.escape(title)}</h3>\n" + "\n".join(html_rows) + "\n</body></html>\n"
    tex = f"% {title}\n% needs \\usepackage{{xcolor}}\n" + "\n".join(tex_rows) + "\n"
    return page, tex


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


def figure10(df: pd.DataFrame) -> Figure:
    """BiLD Figure 10: one latency-quality curve per rollback threshold, marker size = fallback threshold,
    one panel per task and pair."""
    panels = [(task, pair, _base(rows, main), _against(pts, rows, main)) for task, rows, main in _tasks(df)
              for pair, pts in rows[rows["policy"] == "bild"].groupby("pair", sort=True)]
    ncols = min(len(panels), 2)
    nrows = int(np.ceil(len(panels) / ncols))
    fig = Figure(figsize=(5.5 * ncols, 4.2 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, (task, pair, base, pts) in zip(axes, panels):
        _reference_lines(ax, base)
        for i, (rb, curve) in enumerate(pts.groupby("rollback_threshold", sort=True)):
            curve = curve.sort_values("fallback_threshold")
            color = f"C{i % 10}"
            ax.plot(curve["normalized_latency"], curve["headline_score"], "-", color=color, lw=1, label=f"rollback {rb:g}")
            ax.scatter(curve["normalized_latency"], curve["headline_score"], s=20 + 120 * curve["fallback_threshold"], color=color)
        ax.set_xlabel(f"latency / vanilla large ({base['pair']}); marker size: fallback threshold", fontsize=8)
        ax.set_title(f"{task}: {pair}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def ppd_table1_frame(df: pd.DataFrame) -> pd.DataFrame:
    """PPD Table 1 (top-1 / top-3 / top-5 match rates, %) for the paper's Vicuna-13B and our testbeds,
    by layer and its depth fraction l/d."""
    paper = paper_table("ppd_table1")
    paper = paper.pivot_table(index=["dataset", "layer", "trained"], columns="top_k", values="match_rate").reset_index()
    out = [{"model": "paper Vicuna-13B (d=40)", "task": r["dataset"], "layer": int(r["layer"]),
            "l/d": r["layer"] / 40, "trained": r["trained"],
            **{f"top-{k}": r[k] for k in (1, 3, 5)}} for _, r in paper.iterrows()]
    rates = ppd.match_rates(df)
    rates = rates[rates["bucket"] == "total"]
    for (task, pair, d, layer, trained), g in rates.groupby(["task", "pair", "d", "layer", "trained"], sort=True):
        by_k = dict(zip(g["k"], g["rate"]))
        out.append({"model": f"ours {pair} (d={d})", "task": task, "layer": int(layer), "l/d": layer / d,
                    "trained": trained, **{f"top-{k}": 100 * by_k[k] if k in by_k else np.nan for k in (1, 3, 5)}})
    return pd.DataFrame(out)


def ppd_latency(df: pd.DataFrame) -> pd.DataFrame:
    """PPD measured (policy=ppd) against Theorem 4.1 at each run's own match rate (claim C8), per task."""
    tables = []
    for task, rows, main in _tasks(df):
        ppd_rows = _against(rows[rows["policy"] == "ppd"], rows, main)
        tables.append(pd.DataFrame({
            "task": task, "pair": ppd_rows["pair"],
            "early layer d̄": ppd_rows["ppd_layer"].map(lambda x: "ceil(d/2)" if pd.isna(x) else str(int(x))),
            "k": ppd_rows["ppd_top_k"].astype(int),
            "match rate": ppd_rows["ppd_match_rate"], "theorem latency": ppd_rows["theorem_latency_ratio"],
            "measured latency": ppd_rows["normalized_latency"], "theorem compute": ppd_rows["theorem_compute_ratio"],
            "score - vanilla": ppd_rows["quality_delta"],
        }).sort_values(["early layer d̄", "k"]))
    return pd.concat(tables, ignore_index=True)


# --- all of them ---------------------------------------------------------------------------------------

def _figure_and_table(build, stem: str, title: str, note: str, df: pd.DataFrame, out: Path) -> list[Path]:
    """An artifact whose builder returns (figure, table): <stem>.png/.pdf and <stem>.md/.tex."""
    fig, table = build(df)
    return plots.save_figure(fig, out / stem) + write_table(table, out / stem, title, note)


_fig2 = partial(_figure_and_table, figure2, "bild_fig2", "BiLD Figure 2: oracle replacement",
                "Paper (WMT, CNN/DM): ~20% of tokens from the large model reach the large model's quality.")
_fig5 = partial(_figure_and_table, figure5, "bild_fig5", "BiLD Figure 5: ablations",
                "Paper (IWSLT, XSUM): both ablations give worse quality-latency trade-offs than full BiLD.")
_fig8 = partial(_figure_and_table, figure8, "bild_fig8", "BiLD Figure 8: cost of BiLD / vanilla large (bildexp/cost.py)",
                "Paper (CNN/DM, 1.85x): FLOPs slightly higher, memory operations ~5x lower, arithmetic intensity ~5x higher.")


def _main(df: pd.DataFrame, out: Path) -> list[Path]:
    return (plots.save_figure(plots.figure4(df, _main_pair(df)), out / "bild_fig4")
            + write_table(bild_table1(df), out / "bild_table1", "BiLD Table 1: the paper (T4) beside ours",
                          "Cells: score, speedup over vanilla large[, (rollback, fallback)]. matched_quality = the paper's "
                          "minimal-degradation row / our fastest run with no loss; matched_latency = within ~1 point.")
            + plots.save_figure(figure10(df), out / "bild_fig10"))


def _baselines(df: pd.DataFrame, out: Path) -> list[Path]:
    early_exit = df["pair"].astype(str).str.contains("early_exit|calm")
    main = df[~early_exit]
    paths: list[Path] = []
    if early_exit.any():  # the layer-wise runs (eager only: none in a compiled sweep)
        fig, table = figures6_7(df)
        paths = (plots.save_figure(fig, out / "bild_fig6_7")
                 + write_table(table, out / "bild_fig6_7", "BiLD Figures 6-7: early exit against CALM"))
    else:
        print("skip bild_fig6_7: no early-exit or CALM runs in the baselines CSV", file=sys.stderr)
    return (paths + plots.save_figure(plots.baselines_figure(main, _main_pair(main)), out / "bild_baselines")
            + write_table(bild_tables3_4(df), out / "bild_table3_4", "BiLD Tables 3-4: against speculative sampling",
                          "Ours: greedy speculative decoding, fastest window; BiLD unaligned at matched latency / quality."))


def _nucleus(df: pd.DataFrame) -> str:
    """The title of a Table 5: the top-p values its sampled rows ran with."""
    sampled = df[plots._as_bool(df.get("sampling", pd.Series(False, index=df.index)))]
    values = sorted(pd.to_numeric(sampled.get("top_p", pd.Series(dtype=float)), errors="coerce").dropna().unique())
    return "nucleus sampling" + (", p = " + " / ".join(f"{v:g}" for v in values) if values else "")


def _table5(df: pd.DataFrame, out: Path) -> list[Path]:
    return write_table(bild_table5(df), out / "bild_table5", f"BiLD Table 5: {_nucleus(df)}",
                       "Cells: score (delta to vanilla large), speedup[, our setting]; aligned small models.")


def _testbed_sweep(stem: str, df: pd.DataFrame, out: Path) -> list[Path]:
    """A testbed experiment (conf/experiment/qwen25_*.yaml): its trade-off figure, BiLD's fronts against speculative
    and hf_assisted (Tables 3-4, the paper's beside), every run with its two phases, and Table 5 when it sampled."""
    paths = (plots.save_figure(plots.baselines_figure(df, _main_pair(df)), out / f"{stem}_fig")
             + write_table(fronts_table(df), out / f"{stem}_table3_4", f"{stem}: BiLD against speculative and hf_assisted",
                           "Greedy runs. match latency: the best-scoring BiLD run at least as fast as the baseline's fastest "
                           "window; match quality: the fastest BiLD run scoring at least as well. Paper rows: T4 GPU.")
             + write_table(phase_table(df), out / f"{stem}_runs", f"{stem}: every run, prompt and decode phases apart",
                           "Against vanilla large (greedy), the run the baseline rule picks for each row (docs/harness.md, "
                           "'Baselines': its interleave group's, else its sitting's nearest in time; column baseline), and "
                           "where vanilla large was timed again after the policies (runner.repeat), the first run's "
                           "speedups beside: a baseline before and after. prefill ms: each "
                           "model's pass over the prompt, per example; decode ms/token: the rest of the latency per output "
                           "token; hf_assisted's phases are not seen."))
    if plots._as_bool(df.get("sampling", pd.Series(dtype=str))).any():
        paths += write_table(bild_table5(df), out / f"{stem}_table5", f"{stem}: {_nucleus(df)}",
                             "Cells: score (delta to sampled vanilla large), speedup over it[, setting].")
    return paths


def _interleaved(stem: str, df: pd.DataFrame, out: Path) -> list[Path]:
    """An interleaved re-measurement of the t5_multi30k artifacts (conf/experiment/interleaved_t5_multi30k*.yaml),
    into out/<stem>/ under the artifacts' own names: Figure 4 and Table 1 (BiLD unaligned and aligned), Figure 5
    (the ablations, aligned pair), Tables 3-4 and, with layer-wise runs, Figures 6-7. Every speedup divides by the
    vanilla-large row of the same interleave group (plots' baseline rule)."""
    sub = out / stem
    sub.mkdir(parents=True, exist_ok=True)
    pair = df["pair"].astype(str)
    plain = df[pair.isin(["t5_multi30k", "t5_multi30k_aligned"])]
    bild, spec = plain["policy"] == "bild", plain["policy"] == "speculative"
    ablation = bild & (np.isinf(pd.to_numeric(plain["rollback_threshold"], errors="coerce")) | (plain["fallback_threshold"] == 0))
    ablations = plain[~spec & ~(bild & (plain["pair"] == "t5_multi30k"))]  # the aligned pair's BiLD runs, full and ablated
    grid = plain[~spec & ~ablation]
    return _main(grid, sub) + _fig5(ablations, sub) + _baselines(df[~((pair == "t5_multi30k_aligned") & (df["policy"] == "bild"))], sub)


def _needs(df: pd.DataFrame, policy: str) -> None:
    if not (df["policy"] == policy).any():
        raise BildexpError(f"no {policy} runs in the CSV")


def _ppd(df: pd.DataFrame, out: Path) -> list[Path]:
    _needs(df, "ppd_match")
    (out / "ppd_tables4_6.md").write_text(ppd.position_tables(df), encoding="utf-8")
    return (write_table(ppd_table1_frame(df), out / "ppd_table1", "PPD Table 1: match rates (%), paper beside ours")
            + [out / "ppd_tables4_6.md"]
            + plots.save_figure(ppd.trade_off_figure(ppd.half_depth_points(df)), out / "ppd_fig2_4"))


def _ppd_latency(df: pd.DataFrame, out: Path) -> list[Path]:
    _needs(df, "ppd")
    return write_table(ppd_latency(df), out / "ppd_latency", "PPD: measured latency against Theorem 4.1",
                       "Ratios to vanilla greedy decoding of the same model; theorem at each run's own match rate.")


# The testbed experiments (conf/experiment/<stem>.yaml) whose CSV becomes a figure and tables (_testbed_sweep).
TESTBED_SWEEPS = ("qwen25_xsum", "qwen25_wmt", "qwen25_int4_xsum", "qwen25_int4_wmt", "qwen25_int4_xsum_interleaved",
                  "qwen25_int4_wmt_interleaved", "qwen25_int4_mixed_xsum", "qwen25_int4_mixed_wmt",
                  "qwen25_int4_mixed_wmt_fine", "qwen25_int4_aligned_wmt")
# Artifact → its CSV (the offline variant's experiment_name, then the paper variant's) and builder.
ARTIFACTS = [
    ("bild_fig2", ("bild_fig2",), _fig2),
    ("bild_fig4_table1 + bild_fig10", ("t5_multi30k", "bild_main"), _main),
    ("bild_fig5", ("bild_fig5",), _fig5),
    ("bild_fig6_7 + bild_table3_4", ("baselines_t5_multi30k", "bild_baselines"), _baselines),
    ("bild_table5", ("bild_table5",), _table5),
    ("bild_fig8", ("bild_fig8",), _fig8),
    ("ppd_table1", ("ppd",), _ppd),
    ("ppd_fig2_4", ("ppd_latency",), _ppd_latency),
    *((stem, (stem,), partial(_testbed_sweep, stem)) for stem in TESTBED_SWEEPS),
    ("interleaved_t5_multi30k", ("interleaved_t5_multi30k",), partial(_interleaved, "interleaved_t5_multi30k")),
    ("interleaved_t5_multi30k_compiled", ("interleaved_t5_multi30k_compiled",),
     partial(_interleaved, "interleaved_t5_multi30k_compiled")),
]


def _fig9(results: Path, out: Path) -> list[Path]:
    tokens = results / "bild_fig9_tokens.jsonl"
    runs = sorted((results / "runs" / "bild_fig9").glob("*/generations.jsonl"))
    if runs:  # a fresh bild_fig9 run: refresh the committed tokens file from it
        records = fig9_tokens(runs[-1], runs[-1].with_name("config.json"))
        tokens.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if not tokens.is_file():
        print(f"skip bild_fig9: {tokens} not found (bildexp reproduce experiment=bild_fig9/... writes it)", file=sys.stderr)
        return []
    page, tex = figure9([json.loads(line) for line in tokens.read_text().splitlines()])
    (out / "bild_fig9.html").write_text(page, encoding="utf-8")
    (out / "bild_fig9.tex").write_text(tex, encoding="utf-8")
    return [out / "bild_fig9.html", out / "bild_fig9.tex"]


def make_figures(results: str | Path, out: str | Path) -> list[Path]:
    """Every artifact whose CSV is in `results`; one line for each that cannot be made (no CSV, no baseline)."""
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise BildexpError(f"no results folder {results}: pass --results, the runner.output_dir of the runs")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, stems, build in ARTIFACTS:
        found = next((results / f"{s}.csv" for s in stems if (results / f"{s}.csv").is_file()), None)
        if found is None:
            print(f"skip {name}: no {' or '.join(s + '.csv' for s in stems)} in {results} (bildexp reproduce writes it)",
                  file=sys.stderr)
            continue
        try:
            paths += build(plots.read_results(found), out)
        except (plots.MissingBaselineError, BildexpError) as err:
            print(f"skip {name}: {err}", file=sys.stderr)
    return paths + _fig9(results, out)
