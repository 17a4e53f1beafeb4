"""Issue 6: artifact configs run (tiny mode), sweeps merge without loss or duplication, figures come from
CSVs alone, and the cost model prices what the forward passes did."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bildexp import PROJECT_ROOT
from bildexp.config import compose_config
from bildexp.cost import ModelCost, run_cost
from bildexp.figures import make_figures
from bildexp.reproduce import artifacts, expand, plan, run_tiny, with_tiny
from bildexp.results import merge_rows, upsert_rows

ARTIFACTS = sorted({a.split("/")[0] for a in artifacts()})


def test_every_artifact_has_both_variants():
    assert len(ARTIFACTS) >= 11
    for name in ARTIFACTS:
        for variant in ("offline", "paper"):
            path = PROJECT_ROOT / "conf" / "experiment" / name / f"{variant}.yaml"
            assert path.is_file(), f"{name} lacks its {variant} variant"
            assert f"bildexp reproduce experiment={name}/{variant}" in path.read_text(), f"{path} is not headed by its command"


OFFLINE = [a for a in artifacts() if a.endswith("/offline")]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """One tiny-mode output folder for the offline variants, filled artifact by artifact as the tests ask (the
    paper variants run on a stand-in hub instead: tests/test_hub_route.py)."""
    folder = tmp_path_factory.mktemp("tiny_offline")
    rows: dict[str, list[dict]] = {}

    def get(experiment: str) -> tuple[Path, list[dict]]:
        if experiment not in rows:
            rows[experiment] = run_tiny(experiment, folder)
        return folder, rows[experiment]

    return get


def assert_every_sweep_ran(experiment: str, rows: list[dict], shrink: str = "tiny") -> None:
    """Each sweep of the artifact contributed a run of its policy."""
    cfg, sweeps = plan(experiment)
    assert rows and all(r["n_examples"] >= 1 for r in rows)
    for sweep in sweeps:
        point = with_tiny(expand(sweep, ends_only=True)[0], getattr(cfg.reproduce, shrink))
        policy = next((o.split("=", 1)[1] for o in point if o.startswith("policy=")), None)
        if policy:
            assert any(r["policy"] == policy for r in rows), f"no {policy} run from {sweep}"


@pytest.mark.parametrize("experiment", OFFLINE)
def test_artifact_runs_in_tiny_mode(experiment, tiny_results):
    """Every sweep of every offline artifact config composes, validates and runs on the tiny pairs (no config rots)."""
    assert_every_sweep_ran(experiment, tiny_results(experiment)[1])


@pytest.mark.parametrize("experiment", [a for a in artifacts() if a.endswith("/paper") and a != "bild_fig10/paper"])
def test_paper_artifact_composes_in_tiny_mode(experiment):
    """`bildexp reproduce experiment=<artifact>/paper --tiny` composes with every sweep's group choices, each value
    axis at its first value (the points run on the stand-in hub in test_hub_route.py; bild_fig10/paper runs
    bild_fig4_table1/paper's sweeps)."""
    cfg, sweeps = plan(experiment)
    for sweep in sweeps:
        for point in expand(sweep, first_only=True):
            assert compose_config(*with_tiny(point, cfg.reproduce.tiny)).pair.name


def check_figures(folder: Path, out: Path) -> None:
    """`bildexp figures` on a variant's CSVs (from tiny runs: degenerate scores) writes every artifact's files."""
    names = {p.name for p in make_figures(folder, out)}
    for stem in ("bild_fig2", "bild_fig4", "bild_fig5", "bild_fig8", "bild_fig10", "ppd_fig2_4"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    for stem in ("bild_table1", "bild_table3_4", "bild_table5", "ppd_table1", "ppd_latency"):
        assert {f"{stem}.md", f"{stem}.tex"} <= names, stem
    assert "bild_fig9.html" in names


def test_figures_from_every_tiny_artifact(tiny_results, tmp_path):
    for experiment in OFFLINE:
        folder, _ = tiny_results(experiment)
    check_figures(folder, tmp_path)


def test_expand_and_tiny_overrides():
    sweep = ["policy=bild", "policy.fallback_threshold=0.3,0.5,0.9", "policy.rollback_threshold=1,2", "pair=a,b"]
    assert len(expand(sweep)) == 12
    ends = expand(sweep, ends_only=True)
    assert len(ends) == 8 and ["policy=bild", "policy.fallback_threshold=0.9", "policy.rollback_threshold=2", "pair=b"] in ends
    assert len(expand(["task=a,b,c", "policy.top_p=0.1,0.5,0.9"], ends_only=True)) == 6  # every group choice stays
    assert with_tiny(["pair=a", "policy=bild", "runner.limit=500"], ["pair=tiny_t5", "runner.limit=2"]) == [
        "policy=bild", "pair=tiny_t5", "runner.limit=2"]


def _upsert(args):
    csv, i = args
    upsert_rows(Path(csv), [{"run_id": f"run{i}", "value": i}])


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    csv = tmp_path / "exp.csv"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_upsert, [(str(csv), i % 24) for i in range(48)])  # every run written twice, concurrently
    df = pd.read_csv(csv)
    assert sorted(df["run_id"]) == sorted(f"run{i}" for i in range(24))


def test_parallel_sweep_merges_without_loss_or_duplication(tmp_path):
    """A local parallel sweep (Hydra's joblib launcher, 2 workers): one row per run in the CSV and one
    row.json per run; `bildexp merge` rebuilds the same CSV from the row.json files alone."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bildexp.cli", "run", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
           f"runner.output_dir={out}", "experiment_name=par", "runner.limit=3", "runner.progress=false", "policy=bild",
           "policy.fallback_threshold=0.3,0.6,0.9", "policy.rollback_threshold=1,3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=PROJECT_ROOT)
    df = pd.read_csv(out / "par.csv")
    assert len(df) == 6 and df["run_id"].nunique() == 6
    assert len(list((out / "runs" / "par").glob("*/row.json"))) == 6
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=PROJECT_ROOT)  # again: every run skipped
    assert len(pd.read_csv(out / "par.csv")) == 6
    (out / "par.csv").unlink()
    assert merge_rows(out) == {out / "par.csv": 6}
    merged = pd.read_csv(out / "par.csv")
    assert sorted(merged["run_id"]) == sorted(df["run_id"])


def test_submitit_sweep_gives_the_rows_of_a_local_one(tmp_path):
    """The cluster route rehearsed: the same sweep through Hydra's submitit launcher (`submitit_local`: the pickled
    job path SLURM takes, each job in a process of its own) and run locally gives the same run ids, tokens and
    scores; `bildexp merge` rebuilds its CSV from the run folders."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sweep = ["experiment_name=sub", "runner.limit=3", "runner.progress=false", "policy=bild",
             "policy.fallback_threshold=0.3,0.9", "policy.rollback_threshold=1"]
    outs = {"local": tmp_path / "local", "submitit": tmp_path / "submitit"}
    for how, out in outs.items():
        launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"] if how == "submitit" else []
        cmd = [sys.executable, "-m", "bildexp.cli", "run", "-m", *launcher, f"runner.output_dir={out}", *sweep]
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=PROJECT_ROOT)
    same = ["run_id", "headline_score", "n_examples", "output_tokens_mean", "large_calls", "fallbacks", "rollbacks"]
    local, sub = (pd.read_csv(o / "sub.csv").sort_values("run_id").reset_index(drop=True) for o in outs.values())
    assert len(local) == 2
    pd.testing.assert_frame_equal(local[same], sub[same])
    jobs = [p for p in (outs["submitit"] / "runs" / "sub" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2  # two jobs went through submitit, each in a folder named by its job id
    for rid in local["run_id"]:
        tokens = [[json.loads(line)["tokens"] for line in (o / "runs" / "sub" / rid / "generations.jsonl").open()]
                  for o in outs.values()]
        assert tokens[0] == tokens[1]
    (outs["submitit"] / "sub.csv").unlink()
    assert merge_rows(outs["submitit"]) == {outs["submitit"] / "sub.csv": 2}
    pd.testing.assert_frame_equal(pd.read_csv(outs["submitit"] / "sub.csv").sort_values("run_id").reset_index(drop=True)[same],
                                  local[same])


def test_merge_keeps_rows_only_in_the_csv(tmp_path):
    """Runs made before row.json existed live only in the CSV: merging keeps them."""
    upsert_rows(tmp_path / "e.csv", [{"run_id": "old", "x": 1}])
    run = tmp_path / "runs" / "e" / "new"
    run.mkdir(parents=True)
    (run / "row.json").write_text(json.dumps({"run_id": "new", "x": 2}))
    merge_rows(tmp_path)
    assert sorted(pd.read_csv(tmp_path / "e.csv")["run_id"]) == ["new", "old"]


def test_cost_model_is_linear_in_the_metered_work(tiny_pair):
    """One pass of k tokens after c cached ones: 2·k·(layer weights) + 2·h·(head) + 4·width·layers·pairs FLOPs;
    the weights read once."""
    cost = ModelCost.of(tiny_pair.large)
    k, c = 4, 10
    counters = {"large_passes": 1, "large_pass_tokens": k, "large_pass_head_tokens": k, "large_pass_context": c,
                "large_pass_attention": k * c + k * (k + 1) // 2}
    flops = 2 * k * (cost.decoder_weights + cost.head_weights) + 4 * cost.attention_width * cost.layers * counters["large_pass_attention"]
    assert cost.flops(counters, "large") == flops
    weight_bytes = (cost.decoder_weights + cost.head_weights) * cost.bytes_per_weight
    assert cost.memory_bytes(counters, "large") == weight_bytes + 2 * cost.kv_width * cost.layers * (c + k) * cost.kv_bytes
    # Doubling the passes of one token doubles the weight traffic; one pass of 2k tokens does not.
    one = run_cost({"large_passes": 1, "large_pass_tokens": 8}, {"large": tiny_pair.large})
    many = run_cost({"large_passes": 8, "large_pass_tokens": 8}, {"large": tiny_pair.large})
    assert many["memory_bytes"] > 7 * one["memory_bytes"] and many["flops"] == one["flops"]
    assert one["arithmetic_intensity"] > many["arithmetic_intensity"]


def test_cost_of_a_hand_computed_t5_and_llama():
    """Shapes counted by hand: T5's cross-attention K/V projections are priced once per example over the source
    (not per decoder token), and a decoder-only prompt pass pays the LM head only for the kept position."""
    from collections import Counter

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from bildexp.cache import ModelState

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
                                             relative_attention_num_buckets=32)).eval()
    cost = ModelCost.of(t5)
    # decoder layer: self q,k,v,o 4·64 + relative bias 32·2 + 3 norms 3·8 + cross q,o 2·64 + FFN 2·8·16; cross k,v 2·64
    assert (cost.decoder_weights, cost.cross_kv_weights, cost.head_weights) == (256 + 64 + 24 + 128 + 256, 128, 80)
    assert cost.encoder_weights == 256 + 64 + 16 + 256  # self-attention, relative bias, 2 norms, FFN
    meter = Counter()
    state = ModelState(t5, torch.tensor([[3, 4, 5, 6, 1]]), meter, "large")  # s = 5
    state.advance(torch.tensor([[0]]))  # k = 1 after c = 0
    state.advance(torch.tensor([[7, 8, 9]]), keep=3)  # k = 3 after c = 1
    assert dict(meter) == {"large_encoder_runs": 1, "large_encoder_tokens": 5, "large_encoder_attention": 25,
                           "large_passes": 2, "large_pass_tokens": 4, "large_pass_head_tokens": 4, "large_pass_context": 1,
                           "large_pass_attention": 1 + (3 + 6), "large_pass_cross_context": 10, "large_pass_cross_attention": 5 + 15}
    # 2·4·728 + 2·4·80 (decoder, head) + 4·8·1·(10 + 20) (self + cross attention) + 2·5·(592 + 128) + 4·8·1·25 (encoder)
    assert cost.flops(meter, "large") == 5824 + 640 + 960 + 7200 + 800
    # fp32: 2 passes x (728 + 80) + 1 encoder run x (592 + 128) weights; K/V 2·8·1·(1 + 4 + 10) entries
    assert cost.memory_bytes(meter, "large") == 4 * (2 * 808 + 720) + 4 * 2 * 8 * 15

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    cost = ModelCost.of(llama)
    # q 8·8 + k, v 2·8·4 + o 8·8 + MLP 3·8·16 + 2 norms 2·8; head 10·8 (untied)
    assert (cost.decoder_weights, cost.head_weights, cost.kv_width) == (64 + 64 + 64 + 384 + 16, 80, 4)
    meter = Counter()
    ModelState(llama, None, meter, "large").advance(torch.tensor([[1, 2, 3, 4, 5, 6]]))  # a 6-token prompt, keep 1
    assert meter["large_pass_tokens"] == 6 and meter["large_pass_head_tokens"] == 1
    assert cost.flops(meter, "large") == 2 * 6 * 592 + 2 * 1 * 80 + 4 * 8 * 1 * 21


def test_figures_from_the_committed_csvs_alone(tmp_path):
    """`make reproduce-figures` on a fresh clone: every artifact's files from results/offline, papers' numbers beside ours."""
    paths = make_figures(PROJECT_ROOT / "results" / "offline", tmp_path)
    names = {p.name for p in paths}
    for stem in ("bild_fig2", "bild_fig4", "bild_fig5", "bild_fig6_7", "bild_fig8", "bild_fig10", "ppd_fig2_4"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    for stem in ("bild_table1", "bild_table3_4", "bild_table5", "bild_fig8", "ppd_table1", "ppd_latency"):
        assert {f"{stem}.md", f"{stem}.tex"} <= names, stem
    assert {"bild_fig9.html", "bild_fig9.tex"} <= names
    for stem in ("qwen25_xsum", "qwen25_wmt", "qwen25_int4_xsum", "qwen25_int4_wmt"):  # the qwen25 testbeds' sweeps
        assert {f"{stem}_fig.png", f"{stem}_table3_4.md", f"{stem}_runs.md"} <= names, stem
    assert "35.08" in (tmp_path / "qwen25_xsum_table3_4.md").read_text()  # the paper's XSUM vanilla row beside ours
    # Table 5's improved_quality holds only a sampled BiLD run that scores above sampled vanilla large: WMT's lost 1.43
    assert "| improved_quality | — |" in (tmp_path / "qwen25_wmt_table5.md").read_text()
    assert "| improved_quality | 18.31 (+0.96)" in (tmp_path / "qwen25_xsum_table5.md").read_text()
    assert "40.32, 1.00x" in (tmp_path / "bild_table1.md").read_text()  # the paper's IWSLT vanilla row
    assert "39.93" in (tmp_path / "bild_table3_4.md").read_text()  # the paper's speculative IWSLT row
    assert "Vicuna-13B" in (tmp_path / "ppd_table1.md").read_text() and "ours" in (tmp_path / "ppd_table1.md").read_text()


@pytest.mark.parametrize("experiment", ["qwen25_int4_mixed_wmt", "interleaved_t5_multi30k"])
def test_interleaved_experiments_time_every_sweep_in_one_group(experiment, tmp_path):
    """reproduce.interleave: every point of every sweep line decoded in one interleaved group (one interleave_group
    for all rows), and the runs table divides each speedup by the vanilla-large run of that group."""
    rows = run_tiny(experiment, tmp_path)
    assert_every_sweep_ran(experiment, rows)
    assert len(rows) >= 5 and len({r["interleave_group"] for r in rows}) == 1
    if experiment.startswith("qwen25"):
        make_figures(tmp_path, tmp_path / "fig")
        runs = (tmp_path / "fig" / f"{experiment}_runs.md").read_text()
        assert "| interleaved |" in runs and "same sitting" not in runs


@pytest.mark.parametrize("experiment", ["qwen25_xsum", "qwen25_wmt", "qwen25_int4_wmt"])
def test_testbed_experiment_runs_in_tiny_mode_and_makes_its_figures(experiment, tmp_path):
    """The qwen25 experiments (top-level configs with reproduce.sweeps) run by `bildexp reproduce` on the tiny Llama
    pair, and `bildexp figures` turns their CSV into the testbed's figure and tables."""
    rows = run_tiny(experiment, tmp_path)
    assert_every_sweep_ran(experiment, rows)
    for r in rows:  # the prompt phase is apart in every row whose passes bildexp runs itself
        assert (r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0) or (r["policy"] == "hf_assisted" and r["prefill_ms"] != r["prefill_ms"])
    names = {p.name for p in make_figures(tmp_path, tmp_path / "fig")}
    assert {f"{experiment}_fig.png", f"{experiment}_table3_4.md", f"{experiment}_runs.md", f"{experiment}_table5.md"} <= names
    assert "nucleus sampling, p = 0.8" in (tmp_path / "fig" / f"{experiment}_table5.md").read_text()  # from top_p
    runs = (tmp_path / "fig" / f"{experiment}_runs.md").read_text()
    if experiment == "qwen25_wmt":  # a BiLD point whose max_small_steps is not the default is told apart
        assert "(rollback, fallback) = (1, 0.6), drafts of at most 2" in runs
    if experiment == "qwen25_int4_wmt":  # the int4 draft alone, and vanilla large timed again after the policies
        assert "| vanilla small (int4) |" in runs and "| vanilla large, repeat 1 |" in runs
        assert all(r["small_quant"] == "int4" and r["quant_group_size"] == 32 for r in rows)


def test_fronts_against_speculative_and_hf_assisted():
    from test_plots import baselines_results

    from bildexp.figures import fronts_table

    df = baselines_results()
    df = df[~df["pair"].str.contains("early_exit")]
    hf = df[df["run_id"] == "spec3"].iloc[0].to_dict() | {"policy": "hf_assisted", "run_id": "hf4", "latency_ms_mean": 600.0,
                                                          "num_draft_tokens": 4}
    t = fronts_table(pd.concat([df, pd.DataFrame([hf])], ignore_index=True)).set_index("row")
    assert t.loc["speculative (fastest window)", "settings"] == "window 6"
    assert t.loc["bild vs speculative (match quality)", "score"] == 40.2  # the fastest BiLD run scoring >= 40.0
    assert t.loc["hf_assisted (fastest window)", "speedup"] == pytest.approx(1000 / 600)
    # Only BiLD's 2.00x run is at least as fast as hf_assisted (1.67x); none scores >= 40.0 that fast.
    assert t.loc["bild vs hf_assisted (match latency)", "score"] == 39.0
    assert t.loc["bild vs hf_assisted (match quality)", "score"] == 40.2
    assert list(t.index).count("vanilla large") == 1


@pytest.mark.parametrize("experiment", ["qwen25_int4_xsum", "qwen25_int4_wmt"])
def test_int4_experiments_compose_on_their_pair(experiment):
    """Every point of the qwen25_int4 experiments composes on the real pair (int4 draft, bf16 large), and vanilla large
    is timed twice: first and again last (runner.repeat=1), the baseline before and after the policies."""
    _, sweeps = plan(experiment)
    points = [compose_config(*point) for sweep in sweeps for point in expand(sweep)]
    assert all((c.pair.name, c.pair.small_quant, c.pair.large_quant) == ("qwen25_int4", "int4", "none") for c in points)
    vanilla_large = [c.runner.repeat for c in points if c.policy.name == "vanilla" and c.policy.which == "large"
                     and not c.policy.sampling]
    assert vanilla_large == [0, 1] and points[0].policy.which == "large" and points[-1].runner.repeat == 1


@pytest.mark.parametrize("experiment, groups", [
    ("qwen25_int4_wmt", (128, None)), ("qwen25_int4_xsum_interleaved", (128, None)),  # ran before the mixed draft
    ("qwen25_int4_mixed_wmt", (64, 128)), ("qwen25_int4_mixed_xsum", (64, 128)),
    ("qwen25_int4_mixed_wmt_fine", (64, 128)), ("qwen25_int4_aligned_wmt", (64, 128))])
def test_int4_experiments_keep_the_draft_they_ran_with(experiment, groups):
    """The pair's draft changed (layers in int4 groups of 64, the head in 128); the experiments that ran with every
    layer in 128 pin it, so every committed row keeps its run id (a rerun skips it), and the mixed ones take the
    pair's setting."""
    from bildexp.results import run_id

    _, sweeps = plan(experiment)
    points = [compose_config(*point) for sweep in sweeps for point in expand(sweep)]
    assert {(c.pair.quant_group_size, c.pair.quant_head_group_size) for c in points} == {groups}
    committed = PROJECT_ROOT / "results" / "offline" / f"{experiment}.csv"
    if committed.is_file():
        assert set(pd.read_csv(committed)["run_id"]) <= {run_id(c) for c in points}
