"""Run one configuration: examples × policy → per-example records → one summary row.

The runner owns everything around `Policy.decode`: tokenization (before the clock starts), warm-up,
timing, detokenization, scoring, the result files, the progress bar and the printed summary.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bildexp import BildexpError, metrics
from bildexp.config import Config
from bildexp.cost import run_cost
from bildexp.models import PairCache
from bildexp.policies import make_policy
from bildexp.policies.base import Policy
from bildexp.results import RunFiles, check_output_dir, config_columns, provenance, run_id
from bildexp.tasks import TaskData, decode, encode, load_task
from bildexp.timing import PROMPT_CLOCK, Stopwatch, apply_threads

# Counters summed over examples into the CSV row (absent counters count as 0).
SUM_COUNTERS = ("output_tokens", "small_steps", "small_tokens", "large_calls", "fallbacks", "rollbacks", "tokens_rolled_back")


def example_seed(base: int, index: int) -> int:
    # Each example gets its own stream, so resuming a sampled run reproduces the same outputs.
    return base * 1_000_003 + index


def summarize(records: list[dict], derived_columns=Policy.derived_columns) -> dict[str, object]:
    """Records of a run's examples → its summary columns; `derived_columns`: the policy's own (`Policy.derived_columns`)."""
    lat = np.array([r["latency_ms"] for r in records], dtype=float)
    # Every counter any policy reported, summed; the common ones always get a column (0 when absent).
    keys = list(SUM_COUNTERS) + sorted({k for r in records for k in r["counters"]} - set(SUM_COUNTERS))
    sums = {k: int(sum(r["counters"].get(k, 0) for r in records)) for k in keys}
    n_tokens = sums["output_tokens"]
    large_tokens = sum(r["provenance"].count("L") for r in records)
    row: dict[str, object] = {
        "n_examples": len(records),
        "latency_ms_mean": float(lat.mean()),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p90": float(np.percentile(lat, 90)),
        "latency_ms_per_token": float(lat.sum() / max(n_tokens, 1)),
        **phase_columns(records, n_tokens),
        "output_tokens_mean": n_tokens / len(records),
        **sums,
        # Share of output tokens the large model produced (paper Figure 9).
        "large_token_share": large_tokens / max(n_tokens, 1),
        "truncated_sources": int(sum(r["truncated"] for r in records)),
    }
    # Rates: fallbacks per small-model decision; rolled-back tokens per small token kept at first.
    row["fallback_rate"] = sums["fallbacks"] / sums["small_steps"] if sums["small_steps"] else 0.0
    row["rollback_rate"] = sums["tokens_rolled_back"] / sums["small_tokens"] if sums["small_tokens"] else 0.0
    row.update(derived_columns(collections.Counter(sums)))
    return row


def phase_columns(records: list[dict], n_tokens: int) -> dict[str, float]:
    """The prompt phase apart from the rest: `prefill_ms` (mean per example of the prompt passes, encoder or first
    decoder pass, of every model the policy ran; timing.PromptClock) and `decode_ms_per_token` (the remaining
    latency per output token). NaN when any record lacks the split (hf_assisted; records written before it)."""
    prefill = [r.get("prefill_ms") for r in records]
    if any(p is None for p in prefill):
        return {"prefill_ms": float("nan"), "decode_ms_per_token": float("nan")}
    decode_ms = sum(r["latency_ms"] for r in records) - sum(prefill)
    return {"prefill_ms": float(np.mean(prefill)), "decode_ms_per_token": float(decode_ms / max(n_tokens, 1))}


def prepare(cfg: Config, pairs: PairCache, data=None) -> tuple[int, object, object, list]:
    """What decoding needs before the clock starts: threads applied, the task's first runner.limit examples
    (`data` when already loaded), the pair, and each example's (prompt, truncated). Also used by scripts/bench_*.py."""
    threads = apply_threads(cfg.pair.threads)
    data = load_task(cfg.task, cfg.runner.limit) if data is None else data
    pair = pairs.get(cfg.pair)
    return threads, data, pair, [encode(ex, cfg.task, pair) for ex in data.examples]


def benchmark_inputs(experiment: str, pair_name: str, limit: int, device: str = "auto") -> tuple[Config, object, list, str]:
    """The benchmark scripts' setup: `experiment`'s task with pair `pair_name` on `device` (cpu, cuda or auto), its first
    `limit` prompts, and the line to print with every number (examples, device, dtype, threads, versions). A device
    that is not there (cuda on a CPU machine) exits in one line instead of timing another one."""
    import torch
    import transformers

    from bildexp.config import compose_config

    try:
        cfg = compose_config(f"experiment={experiment}", f"pair={pair_name}", f"runner.limit={limit}", f"pair.device={device}")
        threads, _, pair, encoded = prepare(cfg, PairCache())
    except BildexpError as err:
        raise SystemExit(f"error: {err}") from None
    header = (f"pair {pair_name}, task {cfg.task.name} ({len(encoded)} examples), device {pair.device}, dtype "
              f"{cfg.pair.dtype}, threads {threads}, torch {torch.__version__}, transformers {transformers.__version__}")
    return cfg, pair, [prompt for prompt, _ in encoded], header


def _skip(cfg: Config, files: RunFiles, row: dict, data=None) -> dict:
    """A complete run: checked against the current data (when its folder can tell), its row put into the CSV
    if an interruption between row.json and the CSV kept it out."""
    if files.data_file.is_file() or files.generations.is_file():
        data = load_task(cfg.task, cfg.runner.limit) if data is None else data
        files.check_data(data.examples, data.data_source, complete=True)
    if files.ensure_in_csv(row):
        print(f"skip {files.rid}: complete; its row was missing from {files.csv}, added now", file=sys.stderr)
    else:
        print(f"skip {files.rid}: already in {files.csv} (runner.force=true to run it again)", file=sys.stderr)
    return row


def run(cfg: Config, pairs: PairCache) -> dict[str, object]:
    """Run (or resume, or skip) one configuration; return its CSV row.

    Before any model is loaded: the output folder must be writable, no other process may be writing this run
    (its run.lock), and a started run must have been made from the same examples (data.json's fingerprint)."""
    with contextlib.ExitStack() as stack:
        opened = _begin(cfg, pairs, stack)
        if isinstance(opened, dict):  # complete already
            return opened
        _warm(opened)
        # In a log file (not a terminal) a bar line every 30 s instead of one per example.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        bar = tqdm(opened.todo, desc=opened.files.rid, unit="ex", disable=not cfg.runner.progress, file=sys.stderr,
                   dynamic_ncols=True, mininterval=interval)
        for i in bar:
            record = _decode(opened, i)
            bar.set_postfix(ms=f"{record['latency_ms']:.0f}", tok=len(record["tokens"]), refresh=False)  # redraws follow mininterval
        bar.close()
        return _finish(opened)


def _begin(cfg: Config, pairs: PairCache, stack: contextlib.ExitStack, data: TaskData | None = None) -> OpenRun | dict:
    """A complete run → its row (no lock needed, no folder made for a run whose row lives only in the CSV); else its
    folder locked until `stack` closes, and the run opened (`_open`)."""
    check_output_dir(cfg.runner.output_dir)
    files = RunFiles(cfg.runner.output_dir, cfg.experiment_name, run_id(cfg))
    done_row = None if cfg.runner.force else files.completed_row()
    if done_row is not None:
        return _skip(cfg, files, done_row, data)
    stack.enter_context(files.lock())
    return _open(cfg, pairs, files, data)


@dataclass
class OpenRun:
    """A run between `_open` and `_finish`: its files (locked by the caller), examples, prompts, policy and records."""

    cfg: Config
    files: RunFiles
    data: TaskData
    pair: object
    prompts: list  # (Prompt, truncated) per example
    policy: Policy
    records: list[dict]
    todo: list[int]  # indices of the examples still to decode
    threads: int
    static: dict  # compile_s, compiled_graphs of this run's warm-up (static path)
    started: float
    late_before: int  # pair.late_compiles() before this run's warm-up examples: any graph compiled after it is late


def _open(cfg: Config, pairs: PairCache, files: RunFiles, data: TaskData | None = None) -> OpenRun | dict:
    """Everything before the first timed example: data (checked against the run folder), pair, prompts, the examples
    already written, every graph compiled (static path). → an OpenRun, or the row of a run another process finished."""
    started = time.perf_counter()
    metrics.check_scoring(cfg.task.scoring, cfg.task.metric)
    data = load_task(cfg.task, cfg.runner.limit) if data is None else data
    if not cfg.runner.force:
        done_row = files.completed_row()
        if done_row is not None:  # finished by another process between our first look and the lock
            return _skip(cfg, files, done_row, data)
        files.check_data(data.examples, data.data_source)
    threads, data, pair, prompts = prepare(cfg, pairs, data)
    policy = make_policy(cfg.policy)
    records = files.start(cfg, cfg.runner.force, data)
    done = {r["id"] for r in records}
    todo = [i for i, ex in enumerate(data.examples) if ex.id not in done]
    # Static path: room for the longest example, and every graph compiled now, not inside a timed example.
    static = pair.prepare_static([p for p, _ in prompts], cfg.task.max_new_tokens, policy.max_pass_tokens())
    if static:
        print(f"{files.rid}: {static['compiled_graphs']} new graphs, {static['compile_s']:.1f} s (pair.compile={cfg.pair.compile})",
              file=sys.stderr)
    return OpenRun(cfg, files, data, pair, prompts, policy, records, todo, threads, static, started, pair.late_compiles())


def _warm(run: OpenRun) -> None:
    """Decode the first runner.warmup examples once, untimed and unrecorded (allocator, caches, lazy init)."""
    for prompt, _ in run.prompts[: min(run.cfg.runner.warmup, len(run.todo))]:
        run.policy.decode(run.pair, prompt, run.cfg.task.max_new_tokens, seed=0)


def _decode(run: OpenRun, i: int) -> dict:
    """Example i, timed, appended to the run's generations.jsonl as it finishes → its record."""
    ex, (prompt, truncated) = run.data.examples[i], run.prompts[i]
    PROMPT_CLOCK.restart()
    with Stopwatch(run.pair.device) as sw:
        gen = run.policy.decode(run.pair, prompt, run.cfg.task.max_new_tokens, seed=example_seed(run.cfg.policy.seed, i))
    record = {
        "id": ex.id,
        "hypothesis": decode(gen.tokens, run.pair),
        "reference": ex.reference,
        "latency_ms": sw.ms,
        "prefill_ms": PROMPT_CLOCK.ms if PROMPT_CLOCK.passes else None,  # None: phases not seen (hf_assisted)
        "counters": gen.counters,
        "provenance": gen.provenance,
        "truncated": truncated,
        "tokens": gen.tokens,
    }
    run.files.append(record)
    run.records.append(record)
    return record


def _finish(run: OpenRun, extra: dict | None = None) -> dict[str, object]:
    """Every example once → scores and the summary row, written to row.json and the CSV."""
    cfg, data, pair, rid = run.cfg, run.data, run.pair, run.files.rid
    order = {ex.id: i for i, ex in enumerate(data.examples)}
    records = run.records
    if sorted(order[r["id"]] for r in records) != list(range(len(data.examples))):  # every example exactly once
        raise BildexpError(f"run {rid}: {len(records)} records for {len(data.examples)} examples; rerun with runner.force=true")
    records.sort(key=lambda r: order[r["id"]])
    hyps, refs = [r["hypothesis"] for r in records], [r["reference"] for r in records]
    scores = metrics.score(cfg.task.metric, hyps, refs)
    paper = metrics.paper_score(cfg.task.metric, hyps, refs, pair.tokenizer, cfg.task.reference_tokens)
    if f"paper_{cfg.task.metric}" not in paper:
        print(f"{rid}: paper_{cfg.task.metric} not computed: {metrics.punkt_missing()}", file=sys.stderr)
    row = {
        "run_id": rid,
        **config_columns(cfg),
        "data": data.data_source,
        "data_split": data.split,
        "headline_metric": cfg.task.metric,
        "headline_score": paper[f"paper_{cfg.task.metric}"] if cfg.task.scoring == "paper" else scores[cfg.task.metric],
        **scores,
        **paper,
        **(summary := summarize(records, run.policy.derived_columns)),
        **run_cost(summary, {"large": pair.large, "small": pair.small}),
        **provenance(pair.device, cfg.pair.dtype, run.threads),
        **run.static,
        **({"late_compiles": pair.late_compiles() - run.late_before} if pair.static else {}),
        **(extra or {}),
        "wall_s": round(time.perf_counter() - run.started, 1),
    }
    run.files.write_row(row)
    return row


def interleave_group(rids: list[str]) -> str:
    """The id of runs timed together: 12 hex digits of sha256 over their sorted run ids."""
    return hashlib.sha256("\n".join(sorted(set(rids))).encode()).hexdigest()[:12]


def run_interleaved(cfgs: list[Config], pairs: PairCache) -> list[dict[str, object]]:
    """Run (or resume, or skip) several configurations of one task together, example by example in rotating order
    (example i decodes point i mod n first), so that a machine's drift in speed hits every point alike. Each point
    keeps its own run folder, generations and CSV row (the same tokens and scores as when run alone); rows timed
    together share an `interleave_group` column. Models load once per pair (and backend) and every graph of every
    point compiles before the first timed example. Resumable like `run`: each point continues after its last
    written example; complete points are skipped."""
    tasks = {repr((c.task, c.runner.limit)) for c in cfgs}
    if len(tasks) > 1:
        raise BildexpError("runner.interleave=true times the points of one task on the same examples: sweep the task "
                           "and runner.limit in separate commands")
    cfgs = list({run_id(c): c for c in cfgs}.values())  # a point given twice runs once
    rids = [run_id(c) for c in cfgs]
    group = interleave_group(rids)
    rows: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        opened: list[OpenRun] = []
        data = load_task(cfgs[0].task, cfgs[0].runner.limit)  # one task, one set of examples for every point
        for cfg, rid in zip(cfgs, rids):
            run_or_row = _begin(cfg, pairs, stack, data)
            if isinstance(run_or_row, dict):
                rows[rid] = run_or_row
            else:
                opened.append(run_or_row)
        for run in opened:  # every point's graphs are compiled by now: a graph compiled from here on is late for all
            run.late_before = run.pair.late_compiles()
        for run in opened:
            _warm(run)
        todo = sorted({i for run in opened for i in run.todo})
        pending = [set(run.todo) for run in opened]
        interval = 0.1 if sys.stderr.isatty() else 30.0
        show = bool(opened) and opened[0].cfg.runner.progress
        bar = tqdm(todo, desc=f"interleaved x{len(opened)} ({group})", unit="ex", disable=not show, file=sys.stderr,
                   dynamic_ncols=True, mininterval=interval)
        for i in bar:
            n = len(opened)
            for j in [(i + k) % n for k in range(n)]:  # rotating order
                if i in pending[j]:
                    _decode(opened[j], i)
        bar.close()
        for run in opened:
            rows[run.files.rid] = _finish(run, {"interleave_group": group})
    return [rows[rid] for rid in rids]
