"""End to end: `bildexp run` composes the real configs, writes CSV rows and JSONL, resumes, sweeps, fails in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from bildexp import BildexpError
from bildexp.cli import main
from bildexp.models import PairCache
from bildexp.results import RunFiles, fmt, run_id
from bildexp.runner import run

from conftest import make_config

SMALL = ["runner.limit=3", "runner.warmup=1", "runner.progress=false", "task.max_new_tokens=24"]


@pytest.fixture
def cli(tmp_path):
    def call(*args: str) -> int:
        GlobalHydra.instance().clear()
        return main(["run", *args, f"runner.output_dir={tmp_path}", *SMALL])

    return call


def test_canonical_floats_and_ids():
    assert fmt(0.6) == "0.6" and fmt(2.0) == "2" and fmt(0.1 + 0.2) == "0.30000000000000004"
    a = make_config("policy=bild", "policy.fallback_threshold=0.6")
    b = make_config("policy=bild", "policy.fallback_threshold=0.6", "runner.output_dir=elsewhere", "runner.force=true")
    c = make_config("policy=bild", "policy.fallback_threshold=0.7")
    assert run_id(a) == run_id(b) != run_id(c)
    assert ".bild-fb0.6-rb2-ms10." in run_id(a)


def test_rows_hold_only_the_policys_own_knobs(cli, tmp_path):
    from bildexp.config import POLICY_FIELDS
    from bildexp.policies import POLICIES

    assert set(POLICIES) == set(POLICY_FIELDS)
    assert cli("-m", "policy=vanilla,bild") == 0
    df = pd.read_csv(tmp_path / "default.csv").set_index("policy")
    assert df.loc["vanilla", "which"] == "large" and pd.isna(df.loc["vanilla", "fallback_threshold"])
    assert pd.isna(df.loc["bild", "which"]) and df.loc["bild", "rollback_threshold"] == 2.0
    assert "top_p" not in df.columns  # greedy runs: the sampling knobs do not apply


def test_zero_threshold_reaches_csv_as_zero(cli, tmp_path):
    assert cli("policy=bild", "policy.fallback_threshold=0.0", "policy.rollback_threshold=0") == 0
    row = pd.read_csv(tmp_path / "default.csv").iloc[0]
    assert row["fallback_threshold"] == 0.0 and row["rollback_threshold"] == 0.0
    assert "fb0-rb0" in row["run_id"]


def test_row_and_generations_content(cli, tmp_path):
    assert cli("policy=bild") == 0
    df = pd.read_csv(tmp_path / "default.csv")
    assert len(df) == 1
    row = df.iloc[0]
    for col in ["fallback_threshold", "rollback_threshold", "max_small_steps", "headline_score", "bleu", "latency_ms_mean",
                "latency_ms_p50", "latency_ms_p90", "fallback_rate", "rollback_rate", "git_sha", "device", "dtype", "threads",
                "torch_version", "transformers_version", "time", "data", "data_split", "task", "pair", "policy"]:
        assert col in df.columns, col
    assert row["n_examples"] == 3 and row["data"] == "builtin:toy" and row["threads"] == 1 and row["dtype"] == "float32"
    lines = [json.loads(x) for x in (tmp_path / "runs" / "default" / row["run_id"] / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for r in lines:
        assert {"id", "hypothesis", "reference", "latency_ms", "counters", "provenance"} <= r.keys()
        assert len(r["provenance"]) == r["counters"]["output_tokens"] and set(r["provenance"]) <= {"L", "S"}
        assert r["latency_ms"] > 0


def test_complete_run_is_skipped_and_force_reruns(cli, tmp_path, capsys):
    assert cli("policy=vanilla") == 0
    t0 = pd.read_csv(tmp_path / "default.csv")["time"].tolist()
    assert cli("policy=vanilla") == 0
    assert "skip" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "default.csv")["time"].tolist() == t0
    assert cli("policy=vanilla", "runner.force=true") == 0
    assert len(pd.read_csv(tmp_path / "default.csv")) == 1


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    cfg = make_config("policy=bild", f"runner.output_dir={tmp_path}", *SMALL)
    pairs = PairCache()
    run(cfg, pairs)
    files = RunFiles(tmp_path, "default", run_id(cfg))
    full = files.generations.read_text().splitlines()
    # Simulate a crash after the first example, mid-way through writing the second, before the run's row
    # (row.json, then the CSV) was written.
    files.generations.write_text(full[0] + "\n" + full[1][:20])
    files.row_file.unlink()
    files.csv.unlink()
    run(cfg, pairs)
    again = [json.loads(x) for x in files.generations.read_text().splitlines()]
    assert [r["id"] for r in again] == [json.loads(x)["id"] for x in full]
    assert [r["hypothesis"] for r in again] == [json.loads(x)["hypothesis"] for x in full]
    assert len(pd.read_csv(files.csv)) == 1


def test_multirun_sweep_writes_one_row_per_point(cli, tmp_path):
    assert cli("-m", "policy=bild", "policy.fallback_threshold=0.3,0.7", "policy.rollback_threshold=1,3") == 0
    df = pd.read_csv(tmp_path / "default.csv")
    assert sorted(zip(df.fallback_threshold, df.rollback_threshold)) == [(0.3, 1.0), (0.3, 3.0), (0.7, 1.0), (0.7, 3.0)]
    assert df.run_id.is_unique


def test_experiment_name_picks_the_csv(cli, tmp_path):
    assert cli("experiment_name=mine") == 0
    assert (tmp_path / "mine.csv").is_file()


@pytest.mark.parametrize(
    "override,message",
    [
        ("policy.fallback_threshold=1.5", "out of range"),
        ("policy.rollback_threshold=-1", "out of range"),
        ("pair.dtype=float8", "not one of"),
        ("task=nope", "unknown task 'nope'"),
        ("pair=mt5_iwslt", "HF_HUB_OFFLINE"),
    ],
)
def test_bad_input_is_one_line(cli, override, message, capsys):
    pol = ["policy=bild"] if override.startswith("policy") else []
    assert cli(*pol, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("bildexp: error:")


def test_vocabulary_mismatch_is_one_line(tmp_path, tiny_pair):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from bildexp.models import load_pair, resolve_path

    small_dir = resolve_path(make_config("pair=tiny_t5").pair.small)
    cfg = AutoConfig.from_pretrained(small_dir)
    cfg.vocab_size += 7
    AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(tmp_path / "odd")
    pair_cfg = make_config("pair=tiny_t5", f"pair.small={tmp_path / 'odd'}").pair
    with pytest.raises(BildexpError, match="vocabulary mismatch"):
        load_pair(pair_cfg)


def test_console_script_help_and_error():
    out = subprocess.run([sys.executable, "-m", "bildexp.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bildexp run" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bildexp.cli", "run", "task=nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_the_command_line_is_the_top_of_the_package():
    """bildexp.cli composes and runs everything; no other module imports it (config composition lives beside the
    schema in bildexp.config), so a library user never loads the command line."""
    import ast
    from pathlib import Path

    import bildexp

    importers = []
    for path in sorted(Path(bildexp.__file__).parent.glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            if any(n == "bildexp.cli" or n.startswith("bildexp.cli.") for n in names):
                importers.append(path.name)
    assert not importers, f"modules importing bildexp.cli: {importers}"


def test_bildexp_modules_import_each_other_without_circles():
    """Every `import bildexp.X` / `from bildexp.X import ...` (at module level or inside functions) is an edge; the
    graph has no cycle (issue 14: models and smollm2 imported each other; first_layers now lives in layerwise)."""
    import ast
    from pathlib import Path

    import bildexp

    root = Path(bildexp.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(("bildexp", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bildexp."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("bildexp."))
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert "bildexp.models" in graph and "bildexp.testbeds.smollm2" in graph


def test_a_sweep_with_one_bad_value_runs_no_point(tmp_path, capsys):
    """Every point of a -m sweep is composed and validated before the first runs."""
    code = main(["run", "-m", "policy=bild", "policy.fallback_threshold=0.3,1.5,0.6", f"runner.output_dir={tmp_path}",
                 "runner.limit=2"])
    assert code == 2 and "policy.fallback_threshold=1.5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "default.csv").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,message", [
    ("runner.warmup=-1", "runner.warmup=-1 must be >= 0"),
    ("pair.large=/nonexistent/model/folder", "folder /nonexistent/model/folder not found: check the path"),
])
def test_more_bad_input_is_one_line(override, message, tmp_path, capsys):
    assert main(["run", override, f"runner.output_dir={tmp_path}", "runner.limit=2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_ctrl_c_prints_the_finished_runs_not_a_traceback(tmp_path):
    """SIGINT during a sweep: exit 130, one line saying how to resume, the summary of the finished runs."""
    import signal
    import time

    def as_in_a_terminal() -> None:
        # The child handles SIGINT as in a terminal, however pytest was started: a shell without job control starts
        # background commands (`make test &`) with SIGINT ignored, children inherit that, and the sweep ran to the end.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "bildexp.cli", "run", "-m", "policy=bild",
                             "policy.fallback_threshold=0.3,0.9", f"runner.output_dir={tmp_path}", "runner.limit=30",
                             "runner.warmup=0", "runner.progress=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_in_a_terminal)
    deadline = time.time() + 120
    while not (tmp_path / "default.csv").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-2000:], out[-1000:])
    assert "interrupted after 1 finished run(s); the same command resumes" in err and "results:" in out
    assert len(pd.read_csv(tmp_path / "default.csv")) == 1  # the finished run's row, no partial one


def test_a_sweep_into_a_file_is_one_line(tmp_path, capsys):
    """-m: Hydra makes its sweep folder before any run, so the output folder is checked with the points."""
    (tmp_path / "file").write_text("")
    assert main(["run", "-m", "policy=bild", "policy.fallback_threshold=0.3,0.6", f"runner.output_dir={tmp_path / 'file'}"]) == 2
    err = capsys.readouterr().err
    assert "is not a writable folder" in err and "Traceback" not in err


@pytest.mark.parametrize("policy, passes", [("vanilla", 1), ("bild", 2), ("speculative", 2), ("calm", 1), ("ppd", 1)])
def test_the_prompt_phase_is_timed_once_per_model(tiny_pair, toy_examples, policy, passes):
    """PromptClock sees each model's pass over the prompt (the encoder, or a decoder-only model's first pass) once,
    and nothing of the decoding after it; the layer-wise policies (calm, ppd) run a decoder-only prompt through
    their layers in slices, each timed (passes counts the slices)."""
    from bildexp.config import PolicyConfig
    from bildexp.policies import make_policy
    from bildexp.tasks import encode
    from bildexp.timing import PROMPT_CLOCK, Stopwatch

    prompt, _ = encode(toy_examples[0], make_config().task, tiny_pair)
    PROMPT_CLOCK.restart()
    with Stopwatch(tiny_pair.device) as sw:
        gen = make_policy(PolicyConfig(name=policy, fallback_threshold=0.9, rollback_threshold=1.0)).decode(tiny_pair, prompt, 16)
    assert len(gen.tokens) > 2
    layer_slices = policy in ("calm", "ppd") and not tiny_pair.is_encoder_decoder
    assert (PROMPT_CLOCK.passes >= passes if layer_slices else PROMPT_CLOCK.passes == passes)
    assert 0 < PROMPT_CLOCK.ms < sw.ms


def test_rows_split_prefill_from_decode(cli, tmp_path):
    from bildexp.runner import phase_columns

    assert cli("policy=bild") == 0
    row = pd.read_csv(tmp_path / "default.csv").iloc[0]
    records = [json.loads(x) for x in (tmp_path / "runs" / "default" / row["run_id"] / "generations.jsonl").read_text().splitlines()]
    prefill = [r["prefill_ms"] for r in records]
    assert all(0 < p < r["latency_ms"] for p, r in zip(prefill, records))
    assert row["prefill_ms"] == pytest.approx(sum(prefill) / 3)
    decode_ms = sum(r["latency_ms"] for r in records) - sum(prefill)
    assert row["decode_ms_per_token"] == pytest.approx(decode_ms / row["output_tokens"])
    records[0]["prefill_ms"] = None  # a policy whose passes the clock cannot see (hf_assisted)
    assert all(v != v for v in phase_columns(records, 10).values())
