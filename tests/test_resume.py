"""Resuming and locking `bildexp run`: a run killed at any moment resumes to the row an uninterrupted run writes,
each example counted once; two processes never write one run; a run folder made from other data is refused before
any model loads; an output folder that cannot be written fails in one line before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from bildexp import PROJECT_ROOT, BildexpError
from bildexp.cli import main
from bildexp.models import PairCache
from bildexp.results import RunFiles, run_id, upsert_rows
from bildexp.runner import run
from bildexp.tasks import load_task

from conftest import make_config

SMALL = ["runner.limit=3", "runner.warmup=0", "runner.progress=false", "task.max_new_tokens=16"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Columns that measure time, not results; git_sha may turn -dirty while the test runs (other edits).
UNTIMED = ("latency", "prefill_ms", "decode_ms", "wall_s", "time", "git_sha")


class NoPairs:
    """A PairCache that fails the test when a model pair is asked for: the error must come before decoding."""

    def get(self, cfg):
        raise AssertionError("a model pair was loaded before the error")


@pytest.fixture(scope="module")
def pairs():
    return PairCache()


def bild(out: Path, *extra: str):
    cfg = make_config("policy=bild", f"runner.output_dir={out}", *SMALL, *extra)
    return cfg, RunFiles(out, "default", run_id(cfg))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def one_line(err: BildexpError) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# Defect 1: killed after row.json, before the CSV update.


def test_a_row_kept_out_of_the_csv_by_a_kill_is_added_on_resume(tmp_path, pairs, capsys):
    cfg, files = bild(tmp_path)
    row = run(cfg, pairs)
    upsert_rows(files.csv, [{"run_id": "another-run", "bleu": 1.0}])
    df = pd.read_csv(files.csv)
    df[df.run_id != files.rid].to_csv(files.csv, index=False)  # row.json written, then killed: the CSV lacks the run
    capsys.readouterr()
    assert run(cfg, NoPairs())["time"] == row["time"]  # complete: nothing decoded again
    assert "missing from" in capsys.readouterr().err
    df = pd.read_csv(files.csv)
    assert sorted(df.run_id) == sorted(["another-run", files.rid]) and df.set_index("run_id").loc[files.rid, "time"] == row["time"]
    run(cfg, NoPairs())
    assert sorted(pd.read_csv(files.csv).run_id) == sorted(["another-run", files.rid])  # exactly once
    # A forced rerun killed between its row.json and the CSV leaves the earlier row in the CSV: row.json wins.
    df.loc[df.run_id == files.rid, "time"] = "2000-01-01T00:00:00+00:00"
    df.to_csv(files.csv, index=False)
    run(cfg, NoPairs())
    df = pd.read_csv(files.csv)
    assert len(df) == 2 and df.set_index("run_id").loc[files.rid, "time"] == row["time"]


# Defect 2: two processes on one run; examples counted twice.

HOLDER = """
import sys, time
from bildexp.results import RunFiles
with RunFiles(sys.argv[1], "default", sys.argv[2]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_held_by_another_process_fails_in_one_line(tmp_path, pairs, capsys):
    cfg, files = bild(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), files.rid], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=PROJECT_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in files.dir.iterdir())
        with pytest.raises(BildexpError) as err:
            run(cfg, NoPairs())
        assert f"run {files.rid} is being written by another process (pid {holder.pid});" in one_line(err.value)
        assert sorted(p.name for p in files.dir.iterdir()) == before and not files.csv.exists()  # nothing written
        GlobalHydra.instance().clear()
        capsys.readouterr()
        assert main(["run", "policy=bild", f"runner.output_dir={tmp_path}", *SMALL]) == 2
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if x.startswith("bildexp: error:")]  # (libraries may warn beside it)
        assert len(errors) == 1 and errors[0].startswith("bildexp: error: run ") and f"(pid {holder.pid})" in errors[0], err
        assert "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    assert run(cfg, pairs)["n_examples"] == 3  # a killed holder's lock is gone with it


def test_resume_counts_each_example_once_and_ignores_other_ids(tmp_path, pairs):
    cfg, files = bild(tmp_path)
    first = run(cfg, pairs)
    full = files.generations.read_text().splitlines()
    foreign = json.dumps({**json.loads(full[0]), "id": "not-in-the-data"})
    # Two writers appended the same examples, and a line of other data slipped in; then both were killed.
    files.generations.write_text("\n".join([full[0], full[1], full[0], foreign, full[1], full[0]]) + "\n")
    files.row_file.unlink()
    files.csv.unlink()
    row = run(cfg, pairs)
    ids = [r["id"] for r in lines(files.generations)]
    assert ids == [json.loads(x)["id"] for x in full]
    assert row["n_examples"] == 3 and pd.read_csv(files.csv)["n_examples"].tolist() == [3]
    for key in ("bleu", "headline_score", "output_tokens", "fallbacks", "rollbacks", "large_token_share"):
        assert row[key] == first[key], key


# Defect 3: the data changed under a started or finished run.


def write_data(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# state: the run killed after its first example ("partial") or finished; "legacy": its folder predates data.json
# (it holds references, not sources: only other ids or references tell). change: other ids, or the same ids
# with other text.
@pytest.mark.parametrize("state,change", [("partial", "ids"), ("partial", "text"), ("complete", "ids"), ("complete", "text"),
                                          ("partial-legacy", "ids"), ("complete-legacy", "ids"), ("complete-legacy", "text")])
def test_a_run_made_from_other_data_is_refused_before_decoding(tmp_path, pairs, state, change):
    toy = [{"id": ex.id, "source": ex.source, "reference": ex.reference} for ex in load_task(make_config().task).examples]
    data = tmp_path / "data.jsonl"
    write_data(data, toy[:3])
    cfg, files = bild(tmp_path / "out", f"task.data_file={data}")
    run(cfg, pairs)
    if state.startswith("partial"):  # killed after the first example
        files.generations.write_text(files.generations.read_text().splitlines()[0] + "\n")
        files.row_file.unlink()
        files.csv.unlink()
    if state.endswith("legacy"):  # a run folder written before data.json existed
        files.data_file.unlink()
    if change == "ids":
        write_data(data, [{**r, "id": f"other-{i}"} for i, r in enumerate(toy[3:6])])
    else:
        write_data(data, [{**r, "source": r["source"] + " extra", "reference": r["reference"] + " extra"} for r in toy[:3]])
    with pytest.raises(BildexpError) as err:
        run(cfg, NoPairs())
    msg = one_line(err.value)
    assert f"run {files.rid} in {tmp_path / 'out'} was made from other data (" in msg and "runner.force=true" in msg
    assert run_id(cfg) == files.rid  # run ids do not hash the data
    # runner.force=true redoes it from the new data; then the plain command skips it.
    row = run(make_config("policy=bild", f"runner.output_dir={tmp_path / 'out'}", f"task.data_file={data}", *SMALL,
                          "runner.force=true"), pairs)
    new_ids = [json.loads(x)["id"] for x in data.read_text().splitlines()]
    assert row["n_examples"] == 3 and [r["id"] for r in lines(files.generations)] == new_ids
    assert run(cfg, NoPairs())["time"] == row["time"]
    assert pd.read_csv(files.csv)["run_id"].tolist() == [files.rid]


# Defect 4: an output folder that cannot be written.


@pytest.mark.parametrize("layout", ["file", "under-a-file", "runs-is-a-file", "read-only"])
def test_an_unwritable_output_dir_fails_in_one_line_before_loading(tmp_path, layout, capsys):
    out = tmp_path / "out"
    if layout == "file":
        out.write_text("not a folder")
    elif layout == "under-a-file":
        (tmp_path / "f").write_text("not a folder")
        out = tmp_path / "f" / "out"
    elif layout == "runs-is-a-file":
        out.mkdir()
        (out / "runs").write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        out.mkdir()
        out.chmod(0o555)
    cfg, _ = bild(out)
    with pytest.raises(BildexpError) as err:
        run(cfg, NoPairs())
    assert str(out) in one_line(err.value) and "runner.output_dir" in str(err.value)
    GlobalHydra.instance().clear()
    capsys.readouterr()
    assert main(["run", "policy=bild", f"runner.output_dir={out}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if x.startswith("bildexp: error: ")]) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.csv"))


# Kill -9 at several moments of a real sweep, resume, compare with an uninterrupted sweep.

N = 8
THRESHOLDS = ("0.3", "0.6", "0.9")
SWEEP = [f"runner.limit={N}", "runner.progress=false", "runner.warmup=0", "task.max_new_tokens=16", "policy=bild",
         f"policy.fallback_threshold={','.join(THRESHOLDS)}"]


def snapshot(out: Path, rids: list[str]) -> dict:
    """Per sweep point: examples in generations.jsonl, whether row.json exists; the CSV's run ids."""
    runs = out / "runs" / "default"
    points = {}
    for i, rid in enumerate(rids):
        d = runs / rid
        if d.is_dir():
            gen = d / "generations.jsonl"
            points[i] = (gen.read_text().count("\n") if gen.is_file() else None, (d / "row.json").is_file())
    csv = out / "default.csv"
    in_csv = [rids.index(r) for r in pd.read_csv(csv)["run_id"]] if csv.is_file() else []
    return {"points": points, "csv": in_csv}


def start_sweep(out: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "bildexp.cli", "run", "-m", *SWEEP, f"runner.output_dir={out}"],
                                stdout=subprocess.DEVNULL, stderr=f, env=ENV, cwd=PROJECT_ROOT, start_new_session=True)


def kill_when(proc: subprocess.Popen, moment, timeout: float = 90.0) -> threading.Thread:
    """A thread that polls the output folder every 2 ms and SIGKILLs the sweep's process group at `moment`."""

    def poll() -> None:
        end = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < end:
            try:
                hit = moment()
            except (OSError, ValueError):
                hit = False  # a file caught mid-replace
            if hit:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


def test_kill_9_at_several_moments_then_resume_equals_an_uninterrupted_sweep(tmp_path, capsys, pairs):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    rids = [run_id(make_config(*SWEEP[:-1], f"policy.fallback_threshold={t}")) for t in THRESHOLDS]
    runs = out / "runs" / "default"

    def n_lines(i: int) -> int:
        gen = runs / rids[i] / "generations.jsonl"
        return gen.read_text().count("\n") if gen.is_file() else 0

    moments = [  # CI time: each moment is a process start (~5 s)
        ("point 1's row.json just written", lambda: (runs / rids[0] / "row.json").is_file()),
        ("point 2 mid-run (>= 3 examples written)", lambda: n_lines(1) >= 3),
    ]
    states = []
    for k, (name, moment) in enumerate(moments):
        proc = start_sweep(out, tmp_path / f"kill{k}.log")
        killer = kill_when(proc, moment)
        if k == 0:  # the uninterrupted sweep, point by point in this process, while the first one starts
            for t in THRESHOLDS:
                run(make_config(*SWEEP[:-1], f"policy.fallback_threshold={t}", f"runner.output_dir={ref}"), pairs)
        killer.join()
        code = proc.wait(timeout=60)
        assert code == -signal.SIGKILL, (name, code, (tmp_path / f"kill{k}.log").read_text()[-2000:])
        states.append((name, snapshot(out, rids)))
    # Resume: two sweeps at once into the same folder; where they meet on one run, one stops in one line.
    final = [start_sweep(out, tmp_path / f"final{k}.log") for k in range(2)]
    codes = [p.wait(timeout=120) for p in final]
    logs = [(tmp_path / f"final{k}.log").read_text() for k in range(2)]
    with capsys.disabled():
        print("\nkill states (point index: (generations lines, row.json), csv: point indices):")
        for name, state in states:
            print(f"  {name}: {state}")
        print(f"  final exit codes {codes}")
    assert 0 in codes, logs
    for code, log in zip(codes, logs):
        assert "Traceback" not in log, log
        if code != 0:
            errors = [x for x in log.splitlines() if x.startswith("bildexp: error:")]
            assert code == 2 and len(errors) == 1 and "is being written by another process (pid" in errors[0], log
    # At least one kill left a started run without its row.
    assert any(n is not None and not done for _, s in states for n, done in s["points"].values()), states

    got, want = pd.read_csv(out / "default.csv"), pd.read_csv(ref / "default.csv")
    assert sorted(got["run_id"]) == sorted(want["run_id"]) == sorted(rids)  # every point exactly once
    assert (got["n_examples"] == N).all()
    got, want = got.set_index("run_id").loc[rids], want.set_index("run_id").loc[rids]
    cols = [c for c in want.columns if not any(t in c for t in UNTIMED)]
    pd.testing.assert_frame_equal(got[cols], want[cols])
    ids = [ex.id for ex in load_task(make_config(*SWEEP[:-1]).task, N).examples]
    keys = ("id", "hypothesis", "tokens", "counters", "provenance", "truncated", "reference")
    for rid in rids:
        mine, theirs = lines(runs / rid / "generations.jsonl"), lines(ref / "runs" / "default" / rid / "generations.jsonl")
        assert [r["id"] for r in mine] == ids  # every example exactly once, in order
        assert [{k: r[k] for k in keys} for r in mine] == [{k: r[k] for k in keys} for r in theirs]
        assert json.loads((runs / rid / "row.json").read_text())["n_examples"] == N
