"""Run ids, provenance, and result files: per-example JSONL and the one-row-per-run CSV, resumable.

Layout under runner.output_dir:
    <experiment_name>.csv                          one summary row per completed run
    runs/<experiment_name>/<run_id>/config.json    the resolved config
    runs/<experiment_name>/<run_id>/generations.jsonl   one line per example, appended as it finishes
    runs/<experiment_name>/<run_id>/row.json       the run's summary row, written when it completes

Concurrent jobs (Hydra's joblib launcher, several machines on one file system) never lose a row: each
run's row.json is its own file, and the CSV is updated under a file lock. `merge_rows` rebuilds the
CSVs from the row.json files, for output folders gathered from machines that shared no file system.

A run id is a pure function of the config values that change results, so an interrupted sweep is
resumed by running the same command again: complete runs are skipped (unless runner.force=true),
a partial run continues after its last written example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from bildexp import PROJECT_ROOT
from bildexp.config import Config, policy_fields

# Config values that say where or how loudly to run, not what is measured.
_NOT_IN_ID = {"output_dir", "force", "progress", "build"}
# Added after results existed: left out of the run id's hash at these defaults, so that earlier runs keep their ids.
_ID_DEFAULTS = {"cache": "dynamic", "compile": "none", "freeze": False, "resize_to_tokenizer": False,
                "hub_revision": "refs/convert/parquet", "hub_files": "{config}/{split}/*.parquet", "hub_rows": None,
                "drop_empty": False, "scoring": "standard", "reference_tokens": 128}
# Section-level `name` fields become these columns.
_NAME_COLUMNS = {"task": "task", "pair": "pair", "policy": "policy"}


def fmt(x: object) -> str:
    """Canonical text of a value: shortest round-trip floats (0.6, never 0.6000000000000001), 2.0 → 2."""
    if isinstance(x, float):
        s = repr(x)
        return s[:-2] if s.endswith(".0") else s
    return str(x)


def _flatten(values: dict[str, object]) -> dict[str, object]:
    """Nested sections (pair.early_exit) contribute their keys, and only when set, so that adding an
    optional sub-section leaves the run ids of runs that do not use it unchanged."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if v is not None})
        else:
            flat[key] = value
    return flat


def config_columns(cfg: Config) -> dict[str, object]:
    """Every config value that affects the run, under its config name: fallback_threshold, dtype, ..."""
    cols: dict[str, object] = {"experiment_name": cfg.experiment_name}
    for section in ("task", "pair", "policy", "runner"):
        values = policy_fields(cfg.policy) if section == "policy" else dataclasses.asdict(getattr(cfg, section))
        for key, value in _flatten(values).items():
            if key in _NOT_IN_ID:
                continue
            name = _NAME_COLUMNS[section] if key == "name" else key
            if name in cols:
                raise AssertionError(f"config name {name!r} appears in two sections")
            cols[name] = value
    return cols


def policy_label(cfg: Config) -> str:
    p = cfg.policy
    if p.name == "vanilla":
        label = f"vanilla-{p.which}"
    elif p.name == "bild":
        label = f"bild-fb{fmt(p.fallback_threshold)}-rb{fmt(p.rollback_threshold)}-ms{p.max_small_steps}"
    elif p.name == "oracle":
        label = f"oracle-r{fmt(p.replace_threshold)}"
    elif p.name in ("speculative", "hf_assisted"):
        label = f"{p.name}-k{p.num_draft_tokens}"
    elif p.name == "calm":
        label = f"calm-{p.confidence_measure}-l{fmt(p.exit_threshold)}-t{fmt(p.exit_decay)}"
    else:
        label = p.name
    if p.sampling:
        label += f"-topp{fmt(p.top_p)}-temp{fmt(p.temperature)}-seed{p.seed}"
    return label


def backend_label(cfg: Config) -> str:
    """'' on the eager dynamic-cache path; '.static', '.static-<compile mode>' or '.static-<compile mode>-frozen'
    otherwise."""
    if cfg.pair.cache == "dynamic":
        return ""
    return ".static" + ("" if cfg.pair.compile == "none" else f"-{cfg.pair.compile}") + ("-frozen" if cfg.pair.freeze else "")


def run_id(cfg: Config) -> str:
    cols = {k: v for k, v in config_columns(cfg).items() if _ID_DEFAULTS.get(k, object()) != v}
    digest = hashlib.sha256(json.dumps({k: fmt(v) for k, v in cols.items()}, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.task.name}.{cfg.pair.name}.{policy_label(cfg)}.{cfg.pair.dtype}{backend_label(cfg)}.{digest}"


def git_sha() -> str:
    repo = PROJECT_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device, dtype: str, threads: int) -> dict[str, object]:
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "git_sha": git_sha(),
        "device": device.type,
        "device_name": name,
        "dtype": dtype,
        "threads": threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def resume_jsonl(path: Path) -> list[dict]:
    """Records of an append-only JSONL, up to a line cut by an interruption; the file is rewritten without
    that line so appends continue on a clean file. A missing file has no records."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # cut mid-write: that item is produced again
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


class RunFiles:
    """The files of one run: config, per-example JSONL (resumable) and the experiment CSV."""

    def __init__(self, output_dir: str | Path, experiment: str, rid: str):
        self.root = Path(output_dir)
        self.csv = self.root / f"{experiment}.csv"
        self.dir = self.root / "runs" / experiment / rid
        self.generations = self.dir / "generations.jsonl"
        self.rid = rid

    @property
    def row_file(self) -> Path:
        return self.dir / "row.json"

    def completed_row(self) -> dict | None:
        if self.row_file.is_file():
            return json.loads(self.row_file.read_text())
        if not self.csv.is_file():  # rows of runs made before row.json existed live only in the CSV
            return None
        df = pd.read_csv(self.csv)
        hit = df[df["run_id"] == self.rid]
        return None if hit.empty else hit.iloc[-1].to_dict()

    def start(self, cfg: Config, force: bool) -> list[dict]:
        """Create the run folder; return the examples already written (none when forced)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if force:
            self.generations.write_text("")
            self.row_file.unlink(missing_ok=True)
        return resume_jsonl(self.generations)

    def append(self, record: dict) -> None:
        with self.generations.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write_row(self, row: dict) -> None:
        """Record this run's row: its own row.json, then the CSV (added, or replaced when forced)."""
        _atomic_write(self.row_file, json.dumps(row, ensure_ascii=False, indent=1, default=_plain) + "\n")
        upsert_rows(self.csv, [row])


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else str(value)  # numpy scalars


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path):
    """An exclusive lock on path + '.lock', held by one process at a time (jobs of a parallel sweep)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upsert_rows(csv: Path, rows: list[dict]) -> int:
    """Add rows to a results CSV, replacing any with the same run_id; under a lock, written atomically so a
    crash never cuts the file. Returns the number of rows in the CSV."""
    with _locked(csv):
        new = pd.DataFrame(rows)
        if csv.is_file():
            old = pd.read_csv(csv)
            old = old[~old["run_id"].isin(new["run_id"])]
            new = pd.concat([old, new], ignore_index=True) if not old.empty else new
        _atomic_write(csv, new.to_csv(index=False))
        return len(new)


def merge_rows(output_dir: str | Path) -> dict[Path, int]:
    """Rebuild <experiment>.csv from every runs/<experiment>/*/row.json under output_dir (folders copied
    together from several machines): rows already in the CSV are kept, a row.json replaces the CSV row of
    its run, and no run appears twice. Returns {csv: rows} per experiment."""
    root = Path(output_dir)
    merged: dict[Path, int] = {}
    for exp_dir in sorted(p for p in (root / "runs").glob("*") if p.is_dir()):
        rows = [json.loads(f.read_text()) for f in sorted(exp_dir.glob("*/row.json"))]
        if rows:
            csv = root / f"{exp_dir.name}.csv"
            merged[csv] = upsert_rows(csv, rows)
    return merged
