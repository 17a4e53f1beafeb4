"""Tests for bildexp.plots on a hand-built results table whose expected picks are worked out below."""

import pandas as pd
import pytest

from bildexp import plots

COLS = ["experiment_name", "run_id", "task", "pair", "policy", "which", "sampling", "fallback_threshold",
        "rollback_threshold", "device", "dtype", "threads", "n_examples", "headline_metric",
        "headline_score", "latency_ms_mean", "latency_ms_p50", "latency_ms_p90", "fallback_rate",
        "rollback_rate", "time"]
NAN = float("nan")


def _row(task, pair, metric, policy, which, fb, rb, score, latency, minute=10, device="cuda"):
    return {
        "experiment_name": "fig4", "run_id": f"{task}-{policy}-{which}-{rb}-{fb}-{minute}", "task": task,
        "pair": pair, "policy": policy, "which": which, "sampling": False,
        "fallback_threshold": fb, "rollback_threshold": rb, "device": device, "dtype": "float16",
        "threads": 4, "n_examples": 100, "headline_metric": metric, "headline_score": score,
        "latency_ms_mean": latency, "latency_ms_p50": latency, "latency_ms_p90": latency * 1.2,
        "fallback_rate": NAN if policy == "vanilla" else 0.1, "rollback_rate": NAN if policy == "vanilla" else 0.02,
        "time": f"2025-01-01T12:{minute:02d}:00+00:00",
    }


def results() -> pd.DataFrame:
    iw = ("iwslt2017", "mt5-iwslt", "bleu")
    xs = ("xsum", "t5-xsum", "rougeL")
    rows = [
        # An older, slower baseline run: the newer one (1000 ms, 40.0) must win.
        _row(*iw, "vanilla", "large", NAN, NAN, 39.0, 2000.0, minute=1),
        _row(*iw, "vanilla", "large", NAN, NAN, 40.0, 1000.0, minute=5),
        _row(*iw, "vanilla", "small", NAN, NAN, 35.0, 400.0),
        #            fb   rb   score latency   speedup  vs 40.0
        _row(*iw, "bild", None, 0.9, 1.0, 40.5, 900.0),   # 1.11x   no loss, slow
        _row(*iw, "bild", None, 0.6, 2.0, 40.3, 700.0),   # 1.43x   no loss
        _row(*iw, "bild", None, 0.4, 2.0, 40.0, 600.0),   # 1.67x   no loss (equal): the pick
        _row(*iw, "bild", None, 0.5, 3.0, 39.5, 550.0),   # 1.82x   within 1
        _row(*iw, "bild", None, 0.3, 3.0, 39.0, 500.0),   # 2.00x   within 1 (exactly −1): the pick
        _row(*iw, "bild", None, 0.2, 5.0, 38.5, 450.0),   # 2.22x   too lossy
        _row(*xs, "vanilla", "large", NAN, NAN, 35.0, 2000.0),
        _row(*xs, "bild", None, 0.5, 3.0, 35.2, 1000.0),  # 2.00x   no loss: the pick
        _row(*xs, "bild", None, 0.3, 5.0, 34.5, 800.0),   # 2.50x   within 1: the pick
        _row(*xs, "bild", None, 0.2, 6.0, 33.0, 700.0),   # 2.86x   too lossy
    ]
    return pd.DataFrame(rows, columns=COLS)


def _md_rows(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_baseline_is_latest_vanilla_large_per_group():
    base = plots.baseline_rows(results())
    assert list(base["task"]) == ["iwslt2017", "xsum"]
    assert list(base["latency_ms_mean"]) == [1000.0, 2000.0]
    assert list(base["headline_score"]) == [40.0, 35.0]


def test_speedup_against_same_task_baseline():
    df = plots.with_speedup(results())
    r = df[(df["task"] == "iwslt2017") & (df["fallback_threshold"] == 0.6)].iloc[0]
    assert r["normalized_latency"] == pytest.approx(0.7)
    assert r["speedup"] == pytest.approx(1000.0 / 700.0)
    assert r["quality_delta"] == pytest.approx(0.3)
    small = df[df["which"] == "small"].iloc[0]
    assert small["speedup"] == pytest.approx(2.5)
    # xsum rows divide by xsum's 2000 ms baseline, not iwslt's 1000 ms.
    x = df[(df["task"] == "xsum") & (df["rollback_threshold"] == 5.0)].iloc[0]
    assert x["speedup"] == pytest.approx(2.5)
    assert x["quality_delta"] == pytest.approx(-0.5)


def test_table1_picks_fastest_no_loss_and_within_one_point():
    picks = plots.table1_frame(results()).set_index(["task", "criterion"])
    got = {k: (r["rollback_threshold"], r["fallback_threshold"], round(r["speedup"], 2))
           for k, r in picks.iterrows()}
    assert got == {
        ("iwslt2017", "no loss"): (2.0, 0.4, 1.67),
        ("iwslt2017", "within 1 point"): (3.0, 0.3, 2.0),
        ("xsum", "no loss"): (3.0, 0.5, 2.0),
        ("xsum", "within 1 point"): (5.0, 0.3, 2.5),
    }


def test_table1_markdown_cells():
    rows = _md_rows(plots.table1(results()))
    assert rows["run"] == ["iwslt2017 / cuda / float16 (bleu)", "xsum / cuda / float16 (rougeL)"]
    assert rows["vanilla large"] == ["40.00, 1.00x", "35.00, 1.00x"]
    assert rows["bild, no loss"] == ["40.00, 1.67x, (2, 0.4)", "35.20, 2.00x, (3, 0.5)"]
    assert rows["bild, within 1 point"] == ["39.00, 2.00x, (3, 0.3)", "34.50, 2.50x, (5, 0.3)"]


def test_table1_separates_policies_and_dashes_when_none_qualifies():
    df = results()
    spec = _row("iwslt2017", "mt5-iwslt", "bleu", "speculative", None, NAN, NAN, 38.0, 800.0)
    rows = _md_rows(plots.table1(pd.concat([df, pd.DataFrame([spec])], ignore_index=True)))
    assert rows["bild, no loss"][0] == "40.00, 1.67x, (2, 0.4)"
    # 38.0 is 2 points below 40.0; xsum has no speculative run at all.
    assert rows["speculative, no loss"] == ["—", "—"]
    assert rows["speculative, within 1 point"] == ["—", "—"]


def test_missing_baseline_names_group_and_command():
    df = results()
    df = df[~((df["task"] == "xsum") & (df["policy"] == "vanilla"))]
    with pytest.raises(ValueError, match=r"run xsum-bild-None-3.0-0.5-10: no vanilla-large run to divide by") as err:
        plots.with_speedup(df)
    assert "bildexp run task=xsum pair=t5-xsum policy=vanilla policy.which=large" in str(err.value)
    assert "\n" not in str(err.value)


def _timed(row: dict, minute: int, **kw) -> dict:
    return row | {"time": f"2025-01-01T12:{minute:02d}:00+00:00", "run_id": f"{row['run_id']}@{minute}", **kw}


def test_baseline_rule_interleave_group_then_sitting_then_nearest():
    """A run divides by the vanilla-large row of its interleave group even when another is nearer in time; else by
    the nearest of its own sitting (git SHA) even when another sitting's is nearer; else by the nearest; and each
    row says which rule chose its baseline."""
    iw = ("iwslt2017", "mt5-iwslt", "bleu")
    v = _row(*iw, "vanilla", "large", NAN, NAN, 40.0, 1000.0)
    b = _row(*iw, "bild", None, 0.6, 2.0, 40.0, 500.0)
    df = pd.DataFrame([
        _timed(v, 0, git_sha="a", interleave_group="g1"),
        _timed(v | {"latency_ms_mean": 800.0}, 29, git_sha="a"),  # nearer to the BiLD runs, same sitting
        _timed(v | {"latency_ms_mean": 1250.0}, 40, git_sha="b"),  # another sitting, nearest to the last run
        _timed(b, 30, git_sha="a", interleave_group="g1"),
        _timed(b, 31, git_sha="a"),
        _timed(b, 41, git_sha="c"),
    ])
    got = plots.with_speedup(df).query("policy == 'bild'")
    assert list(got["speedup"]) == [2.0, 1.6, 2.5]
    assert list(got["baseline_rule"]) == ["interleaved", "same sitting", "other sitting"]
    assert list(got["baseline_run"]) == [df["run_id"][0], df["run_id"][1], df["run_id"][2]]


@pytest.mark.parametrize("column, value", [("n_examples", 50), ("threads", 2), ("dtype", "bfloat16"),
                                           ("compile", "default"), ("large", "other-model")])
def test_baseline_rule_refuses_to_divide_across_settings(column, value):
    """No vanilla-large run with the same example count, threads, dtype, backend and large model: one line naming
    what differs, never a speedup against a run of another setting."""
    iw = ("iwslt2017", "mt5-iwslt", "bleu")
    df = pd.DataFrame([_row(*iw, "vanilla", "large", NAN, NAN, 40.0, 1000.0),
                       _row(*iw, "bild", None, 0.6, 2.0, 40.0, 500.0) | {column: value}])
    with pytest.raises(plots.MissingBaselineError, match=rf"nearest differs in {column} \(") as err:
        plots.with_speedup(df)
    assert "\n" not in str(err.value)


def test_baseline_does_not_cross_devices():
    df = results()
    cpu = _row("iwslt2017", "mt5-iwslt", "bleu", "bild", None, 0.6, 2.0, 40.3, 7000.0, device="cpu")
    with pytest.raises(ValueError, match=r"task=iwslt2017 device=cpu dtype=float16"):
        plots.baseline_rows(pd.concat([df, pd.DataFrame([cpu])], ignore_index=True))


def test_figure4_axes():
    fig = plots.figure4(results())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["iwslt2017 / cuda / float16", "xsum / cuda / float16"]
    assert [ax.get_ylabel() for ax in axes] == ["bleu", "rougeL"]
    # Solid line at baseline quality, dashed one point below.
    hlines = sorted(l.get_ydata()[0] for l in axes[0].get_lines() if list(l.get_xdata()) == [0, 1])
    assert hlines == [39.0, 40.0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"vanilla large", "vanilla small", "bild", "rollback 2", "rollback 5"} <= set(labels)


def test_make_all_writes_files(tmp_path):
    csv = tmp_path / "fig4.csv"
    results().to_csv(csv, index=False)
    paths = plots.make_all(csv, tmp_path / "out")
    assert [p.name for p in paths] == ["fig4_figure4.png", "fig4_figure4.pdf", "fig4_table1.md"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert all(p.stat().st_size > 1000 for p in paths[:2])
    md = paths[2].read_text()
    assert "40.00, 1.67x, (2, 0.4)" in md


def test_aligned_pair_is_its_own_series():
    df = results()
    aligned = _row("iwslt2017", "mt5-iwslt-aligned", "bleu", "bild", None, 0.9, 3.0, 40.1, 550.0)
    rows = _md_rows(plots.table1(pd.concat([df, pd.DataFrame([aligned])], ignore_index=True)))
    assert rows["bild, aligned, no loss"] == ["40.10, 1.82x, (3, 0.9)", "—"]
    assert rows["bild, no loss"] == ["40.00, 1.67x, (2, 0.4)", "35.20, 2.00x, (3, 0.5)"]


def baselines_results() -> pd.DataFrame:
    """One group with two large models (the BiLD pair's and a fine-tuned early-exit one) and every baseline."""
    iw = ("iwslt2017", "mt5-iwslt", "bleu")
    rows = [
        _row(*iw, "vanilla", "large", NAN, NAN, 40.0, 1000.0, minute=5),
        # The early-exit pair's own large model, run later and faster by noise: it must NOT be the baseline.
        _row("iwslt2017", "mt5-iwslt-early_exit", "bleu", "vanilla", "large", NAN, NAN, 38.0, 800.0, minute=9)
        | {"large": "early-exit-model"},
        #            fb   rb   score latency   speedup
        _row(*iw, "bild", None, 0.9, 1.0, 40.5, 900.0),   # 1.11x
        _row(*iw, "bild", None, 0.6, 2.0, 40.2, 760.0),   # 1.32x  both picks
        _row(*iw, "bild", None, 0.5, 3.0, 39.8, 700.0),   # 1.43x
        _row(*iw, "bild", None, 0.3, 3.0, 39.0, 500.0),   # 2.00x
        _row("iwslt2017", "mt5-iwslt-early_exit", "bleu", "bild", None, 0.4, 1.0, 37.5, 600.0) | {"large": "early-exit-model"},
    ]
    for k, lat in ((3, 850.0), (6, 800.0)):  # speculative greedy is exact: the baseline's score
        r = _row(*iw, "speculative", None, NAN, NAN, 40.0, lat)
        rows.append(r | {"num_draft_tokens": k, "run_id": f"spec{k}", "fallback_rate": 1 / k, "rollback_rate": 0.3})
    r = _row(*iw, "calm", None, NAN, NAN, 39.5, 700.0)
    rows.append(r | {"run_id": "calm"})
    return pd.DataFrame(rows)


def test_table3_picks_match_latency_and_match_quality():
    t = plots.table3_frame(baselines_results(), baseline_pair="mt5-iwslt").set_index("row")
    assert t.loc["vanilla large", "latency_ms_mean"] == 1000.0  # the named pair's baseline, not the later one
    assert t.loc["speculative (fastest window)", "num_draft_tokens"] == 6  # 1.25x
    # At least as fast as speculative (>= 1.25x): 1.32x/40.2, 1.43x/39.8, 2.00x/39.0 → the best score, 40.2.
    assert t.loc["bild (match latency)", "speedup"] == pytest.approx(1000 / 760)
    # Scoring at least speculative's 40.0: 40.5 (1.11x) and 40.2 (1.32x) → the fastest, 1.32x.
    assert t.loc["bild (match quality)", "headline_score"] == 40.2
    text = plots.table3(baselines_results(), baseline_pair="mt5-iwslt")
    assert "| speculative (fastest window) | 40.00 | 1.25x | 16.67% | 30.00% | window 6 |" in text


def test_baselines_figure_has_one_pareto_curve_per_series(tmp_path):
    df = baselines_results()
    fig = plots.baselines_figure(df, baseline_pair="mt5-iwslt")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [lab.split(" (")[0] for lab in labels] == ["bild", "bild, early_exit", "calm", "speculative"]
    # Every bild run here is on the front: each faster one scores lower.
    front = plots.pareto(plots._methods(df, "mt5-iwslt").query("series == 'bild'"))
    assert list(front["headline_score"]) == [39.0, 39.8, 40.2, 40.5]
    df.to_csv(tmp_path / "b.csv", index=False)
    names = sorted(p.name for p in plots.make_all(tmp_path / "b.csv", tmp_path / "fig", "mt5-iwslt"))
    assert names == ["b_baselines.pdf", "b_baselines.png", "b_figure4.pdf", "b_figure4.png", "b_table1.md", "b_table3.md"]


def test_plot_figures_and_merge_on_bad_results_are_one_line(tmp_path, capsys):
    """Empty, header-only and BiLD-only CSVs, and missing folders: one line each (exit 2), or a skip line per
    artifact from `bildexp figures`, never a traceback."""
    from bildexp.cli import main
    from bildexp.config import compose_config
    from bildexp.models import PairCache
    from bildexp.runner import run

    runs = tmp_path / "runs_out"
    run(compose_config("policy=bild", "runner.limit=2", "runner.warmup=0", f"runner.output_dir={runs}",
                       "runner.progress=false"), PairCache())
    bild_only = (runs / "default.csv").read_text()
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(bild_only.splitlines()[0] + "\n")
    (tmp_path / "bild.csv").write_text(bild_only)
    for name, message in (("empty", "is empty: it holds no runs"), ("header", "holds no runs"), ("bild", "no vanilla-large baseline")):
        assert main(["plot", "--csv", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert main(["merge", "--dir", str(tmp_path / "nope")]) == 2
    assert main(["figures", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "pass --dir" in (err := capsys.readouterr().err) and "pass --results" in err
    folder = tmp_path / "results"
    folder.mkdir()
    for stem in ("t5_multi30k", "baselines_t5_multi30k", "bild_table5", "bild_fig8", "bild_fig2", "ppd", "ppd_latency"):
        (folder / f"{stem}.csv").write_text(bild_only)
    (folder / "bild_fig5.csv").write_text("")
    assert main(["figures", "--results", str(folder), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "skip ppd_table1: no ppd_match runs" in err and "bild_fig5.csv is empty" in err and "Traceback" not in err
