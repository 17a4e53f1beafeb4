"""Interleaved sweeps (runner.interleave=true): every point decoded in one process, example by example in rotating
order; each point's run folder, tokens and scores equal the same point run alone; one interleave_group; resumable."""

from __future__ import annotations

import pandas as pd
import pytest

from bildexp import BildexpError

from bildexp.cli import main
from bildexp.models import PairCache
from bildexp.results import read_records
from bildexp.runner import run, run_interleaved

from conftest import make_config

COMMON = ["pair=tiny_t5", "runner.limit=6", "runner.warmup=1", "task.max_new_tokens=12", "runner.progress=false"]
POINTS = [["policy=vanilla"],
          ["policy=bild", "policy.fallback_threshold=0.5", "policy.rollback_threshold=2"],
          ["policy=speculative", "policy.num_draft_tokens=3"]]


def _configs(out) -> list:
    return [make_config(*COMMON, *p, f"runner.output_dir={out}") for p in POINTS]


def _tokens(out, row) -> dict:
    path = out / "runs" / row["experiment_name"] / row["run_id"] / "generations.jsonl"
    return {r["id"]: r["tokens"] for r in read_records(path)}


def test_interleaved_points_equal_the_same_points_run_alone(tmp_path):
    pairs = PairCache()
    alone = [run(cfg, pairs) for cfg in _configs(tmp_path / "alone")]
    together = run_interleaved(_configs(tmp_path / "inter"), pairs)
    assert [r["run_id"] for r in together] == [r["run_id"] for r in alone]
    for a, b in zip(alone, together):
        assert _tokens(tmp_path / "alone", a) == _tokens(tmp_path / "inter", b)
        assert (a["headline_score"], a["output_tokens"], a["large_calls"]) == (b["headline_score"], b["output_tokens"], b["large_calls"])
        assert "interleave_group" not in a
    assert len({r["interleave_group"] for r in together}) == 1
    assert len(pd.read_csv(tmp_path / "inter" / "default.csv")) == 3

    # A kill mid-sweep: point 2 finished 2 examples, its row never written; point 3 complete but missing from the CSV.
    inter = tmp_path / "inter"
    cut, kept = together[1], together[2]
    folder = inter / "runs" / cut["experiment_name"] / cut["run_id"]
    (folder / "row.json").unlink()
    lines = (folder / "generations.jsonl").read_text().splitlines(keepends=True)
    (folder / "generations.jsonl").write_text("".join(lines[:2]))
    csv = pd.read_csv(inter / "default.csv")
    csv[~csv["run_id"].isin([cut["run_id"], kept["run_id"]])].to_csv(inter / "default.csv", index=False)
    resumed = run_interleaved(_configs(inter), pairs)
    assert [_tokens(inter, r) for r in resumed] == [_tokens(tmp_path / "alone", a) for a in alone]
    assert resumed[1]["n_examples"] == 6 and len(read_records(folder / "generations.jsonl")) == 6
    assert sorted(pd.read_csv(inter / "default.csv")["run_id"]) == sorted(r["run_id"] for r in alone)


def test_interleaved_sweep_from_the_command_line(tmp_path, capsys):
    argv = ["run", "-m", *COMMON, f"runner.output_dir={tmp_path}", "runner.interleave=true", "policy=vanilla",
            "policy.which=large,small"]
    assert main(argv) == 0
    df = pd.read_csv(tmp_path / "default.csv")
    assert sorted(df["which"]) == ["large", "small"] and df["interleave_group"].nunique() == 1
    assert not (tmp_path / "runs" / "default" / "multirun.yaml").exists()  # no Hydra launcher involved
    capsys.readouterr()
    assert main([*argv, "hydra/launcher=parallel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runner.interleave=true decodes every point in one process" in err


def test_a_sweep_over_tasks_is_not_interleaved(tmp_path):
    cfgs = [make_config(*COMMON, f"runner.output_dir={tmp_path}"), make_config(*COMMON, "runner.limit=3", f"runner.output_dir={tmp_path}")]
    with pytest.raises(BildexpError, match="one task on the same examples"):
        run_interleaved(cfgs, PairCache())
    assert not list(tmp_path.glob("runs/*/*/generations.jsonl"))
