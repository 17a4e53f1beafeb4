"""Run ids, provenance, and result files: per-example JSONL and the one-row-per-run CSV, resumable.

Layout under runner.output_dir:
    <experiment_name>.csv                          one summary row per completed run
    runs/<experiment_name>/<run_id>/config.json    the resolved config
    runs/<experiment_name>/<run_id>/generations.jsonl   one line per example, appended as it finishes
    runs/<experiment_name>/<run_id>/row.json       the run's summary row, written when it completes
    runs/<experiment_name>/<run_id>/data.json      the fingerprint of the examples the run decodes
    runs/<experiment_name>/<run_id>/run.lock       flock'ed by the process writing the run (holds its pid)

Concurrent jobs (Hydra's joblib launcher, several machines on one file system) never lose a row: each
run's row.json is its own file, and the CSV is updated under a file lock. `merge_rows` rebuilds the
CSVs from the row.json files, for output folders gathered from machines that shared no file system.
Two processes never write one run: the second fails in one line (`RunFiles.lock`).

A run id is a pure function of the config values that change results, so an interrupted sweep is
resumed by running the same command again: complete runs are skipped (unless runner.force=true) and
their row put into the CSV if an interruption kept it out; a partial run continues after its last
written example, each example counted once. The run id does not hash the data (ids of committed
results stay valid): data.json does, and a run folder made from other data is refused, not resumed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from bildexp import PROJECT_ROOT, BildexpError
from bildexp.config import Config, policy_fields

# Config values that say where or how loudly to run, not what is measured.
_NOT_IN_ID = {"output_dir", "force", "progress", "build", "interleave"}
# Added after results existed: left out of the run id's hash at these defaults, so that earlier runs keep their ids.
_ID_DEFAULTS = {"cache": "dynamic", "compile": "none", "freeze": False, "resize_to_tokenizer": False,
                "hub_revision": "refs/convert/parquet", "hub_files": "{config}/{split}/*.parquet", "hub_rows": None,
                "drop_empty": False, "scoring": "standard", "reference_tokens": 128,
                "small_quant": "none", "large_quant": "none", "quant_group_size": 128, "quant_dense_rows": 0, "repeat": 0,
                "quant_head_group_size": None}
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
    if cols.get("device") == "auto":  # the device it runs on: a run on a GPU and one on a CPU are different runs
        from bildexp.models import resolve_device

        cols["device"] = resolve_device("auto").type
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
    if cfg.runner.repeat:
        label += f"-repeat{cfg.runner.repeat}"
    return label


def backend_label(cfg: Config) -> str:
    """'' on the eager dynamic-cache path; '.static', '.static-<compile mode>' or '.static-<compile mode>-frozen'
    otherwise."""
    if cfg.pair.cache == "dynamic":
        return ""
    return ".static" + ("" if cfg.pair.compile == "none" else f"-{cfg.pair.compile}") + ("-frozen" if cfg.pair.freeze else "")


def quant_label(cfg: Config) -> str:
    """'' with full-precision weights; '.small-int4-g128', '.large-int8', '.small-int4-g64-head128-dense16', ... naming
    each quantized model."""
    p = cfg.pair
    head = f"-head{p.quant_head_group_size}" if p.quant_head_group_size else ""
    parts = [f"{role}-{mode}" + (f"-g{p.quant_group_size}{head}" if mode == "int4" else "")
             + (f"-dense{p.quant_dense_rows}" if p.quant_dense_rows else "")
             for role, mode in (("large", p.large_quant), ("small", p.small_quant)) if mode != "none"]
    return "".join(f".{part}" for part in parts)


def run_id(cfg: Config) -> str:
    cols = {k: v for k, v in config_columns(cfg).items() if _ID_DEFAULTS.get(k, object()) != v}
    digest = hashlib.sha256(json.dumps({k: fmt(v) for k, v in cols.items()}, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.task.name}.{cfg.pair.name}.{policy_label(cfg)}.{cfg.pair.dtype}{backend_label(cfg)}{quant_label(cfg)}.{digest}"


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
        # How idle OpenMP threads wait (read once, when torch starts): PASSIVE sleeps, so with 2 threads each of a step's
        # many small kernels pays a wake-up (an int4 0.5B step: ~45 ms against ~25 ms spinning; docs/testbeds.md).
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_records(path: Path) -> list[dict]:
    """Records of an append-only JSONL up to a line cut by an interruption (read only; none when missing)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # cut mid-write: that item is produced again
    return records


def resume_jsonl(path: Path, ids: set[str] | None = None) -> list[dict]:
    """Records of an append-only JSONL, up to a line cut by an interruption; the file is rewritten without
    that line so appends continue on a clean file. A missing file has no records. With `ids`: only the
    first record of each id in `ids` (a repeated or foreign line is dropped from the file too)."""
    records = read_records(path)
    if ids is not None:
        seen: set[str] = set()
        kept = []
        for r in records:
            if isinstance(r, dict) and r.get("id") in ids and r["id"] not in seen:
                seen.add(r["id"])
                kept.append(r)
        records = kept
    if path.is_file():
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def data_fingerprint(examples) -> str:
    """16 hex digits of sha256 over the examples' (id, source, reference), in order: a run's data identity."""
    text = json.dumps([[ex.id, ex.source, ex.reference] for ex in examples], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_output_dir(output_dir: str | Path) -> Path:
    """runner.output_dir is (or can be made) a folder this process can write in; else one BildexpError line."""
    root = Path(output_dir)
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(20, "a file is in its place")
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bildexp-write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BildexpError(f"runner.output_dir {root} is not a writable folder ({err.strerror or err}): "
                           f"fix its permissions or pass another runner.output_dir") from None
    return root


class RunFiles:
    """The files of one run: config, data fingerprint, per-example JSONL (resumable), lock and the experiment CSV."""

    def __init__(self, output_dir: str | Path, experiment: str, rid: str):
        self.root = Path(output_dir)
        self.csv = self.root / f"{experiment}.csv"
        self.dir = self.root / "runs" / experiment / rid
        self.generations = self.dir / "generations.jsonl"
        self.rid = rid

    @property
    def row_file(self) -> Path:
        return self.dir / "row.json"

    @property
    def data_file(self) -> Path:
        return self.dir / "data.json"

    def completed_row(self) -> dict | None:
        if self.row_file.is_file():
            return json.loads(self.row_file.read_text())
        if self.data_file.is_file():  # started by this version and not finished: a CSV row is an earlier completion's
            return None
        if not self.csv.is_file():  # rows of runs made before row.json existed live only in the CSV
            return None
        df = pd.read_csv(self.csv)
        hit = df[df["run_id"] == self.rid]
        return None if hit.empty else hit.iloc[-1].to_dict()

    def csv_holds(self, row: dict) -> bool:
        """The CSV has this run's row (the same completion: its `time` matches when both have one)."""
        if not self.csv.is_file():
            return False
        df = pd.read_csv(self.csv)
        hit = df[df["run_id"] == self.rid]
        if hit.empty:
            return False
        if "time" in hit.columns and "time" in row:
            return str(hit.iloc[-1]["time"]) == str(row["time"])
        return True

    def ensure_in_csv(self, row: dict) -> bool:
        """Put a complete run's row into the CSV when an interruption between row.json and the CSV kept it out
        (or left an earlier completion's row there); True when the CSV was changed. Exactly one row per run."""
        if self.csv_holds(row):
            return False
        upsert_rows(self.csv, [row])
        return True

    @contextmanager
    def lock(self):
        """Hold run.lock in the run folder (fcntl.flock, non-blocking) while this process writes the run: a second
        process (another sweep into the same folder) fails in one line instead of appending to the same files."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise BildexpError(f"cannot write run folder {self.dir} ({err.strerror or err}): fix its permissions or "
                               f"pass another runner.output_dir") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, host = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
                where = f" on {host}" if host and host != socket.gethostname() else ""
                raise BildexpError(f"run {self.rid} is being written by another process (pid {pid or 'unknown'}{where}); "
                                   f"wait for it to finish or pass another runner.output_dir") from None
            except OSError as err:  # ENOLCK: a file system without locks
                raise BildexpError(f"cannot lock {self.dir / 'run.lock'} ({err.strerror or err}): put runner.output_dir "
                                   f"on a file system with file locks") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            try:
                yield self
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def check_data(self, examples, data_source: str, complete: bool = False) -> None:
        """Refuse (one BildexpError line) a run folder made from other examples than `examples`: its data.json
        fingerprint differs, or, in a folder from before data.json, its generations hold an id the data lacks or
        another reference (or, `complete`, not every id)."""
        why = None
        if self.data_file.is_file():
            stored = json.loads(self.data_file.read_text())
            now = data_fingerprint(examples)
            if stored.get("fingerprint") != now:
                why = (f"data fingerprint {stored.get('fingerprint')} of {stored.get('examples')} examples from "
                       f"{stored.get('source')}; now {now} of {len(examples)} from {data_source}")
        else:
            refs = {ex.id: ex.reference for ex in examples}
            records = [r for r in read_records(self.generations) if isinstance(r, dict)]
            odd = next((r for r in records if refs.get(r.get("id"), object()) != r.get("reference")), None)
            if odd is not None:
                why = f"its generations.jsonl holds example {odd.get('id')!r}, " + (
                    f"not in {data_source}" if odd.get("id") not in refs else f"whose reference differs in {data_source}")
            elif complete and records and {r.get("id") for r in records} != set(refs):
                why = f"its generations.jsonl holds {len({r.get('id') for r in records})} examples, {data_source} {len(refs)}"
        if why:
            raise BildexpError(f"run {self.rid} in {self.root} was made from other data ({why}): use runner.force=true "
                               f"to redo it or another runner.output_dir")

    def start(self, cfg: Config, force: bool, data) -> list[dict]:
        """Create the run folder and record the fingerprint of `data` (a TaskData); return the examples already
        written (none when forced): the first line of each id of data.examples, never a repeated or foreign one."""
        examples = data.examples
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if force:
            self.row_file.unlink(missing_ok=True)  # first: an interruption never leaves a row beside no generations
            self.generations.write_text("")
        info = {"fingerprint": data_fingerprint(examples), "source": data.data_source, "split": data.split,
                "examples": len(examples)}
        _atomic_write(self.data_file, json.dumps(info, ensure_ascii=False, indent=1) + "\n")
        return resume_jsonl(self.generations, {ex.id for ex in examples})

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


def summary_table(rows: list[dict]) -> str:
    """The short table `bildexp run` and `bildexp reproduce` print after their runs."""
    cols = ["policy", "which", "fallback_threshold", "rollback_threshold", "n_examples", "headline_metric",
            "headline_score", "latency_ms_mean", "large_token_share", "fallback_rate", "rollback_rate"]
    import pandas as pd

    df = pd.DataFrame(rows).reindex(columns=cols)  # a policy's row lacks the others' knobs
    return df.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="")
