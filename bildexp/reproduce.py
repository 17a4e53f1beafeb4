"""`bildexp reproduce`: run every sweep of one paper artifact's experiment config (conf/experiment/<artifact>/).

An artifact's config (`offline.yaml` or `paper.yaml`) is an ordinary experiment config plus a `reproduce`
section: commands to `prepare` (train heads, build a testbed) and the `sweeps`, each one `bildexp run -m`
after `experiment=<artifact>/<variant>`. Every run is resumable (complete runs are skipped), so an
interrupted reproduction continues where it stopped when the same command is given again.

With `reproduce.interleave: true` every point of every sweep runs in this process as one interleaved group
(`runner.interleave`: examples in rotating order, one `interleave_group`), so drift in the machine's speed hits the
policies and their vanilla-large baseline alike; resumable the same way.

`--tiny` runs the same sweeps on the tiny pairs with a few examples, each swept axis cut to its first and
last values, into a scratch folder: a check in seconds that the config still composes and runs.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bildexp import PROJECT_ROOT, BildexpError

EXPERIMENT_DIR = PROJECT_ROOT / "conf" / "experiment"


def artifacts() -> list[str]:
    """Every artifact config, as `experiment=` names: bild_fig2/offline, bild_fig2/paper, ..."""
    return sorted(str(p.relative_to(EXPERIMENT_DIR).with_suffix("")) for p in EXPERIMENT_DIR.glob("*/*.yaml"))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(sweep: list[str], ends_only: bool = False, first_only: bool = False) -> list[list[str]]:
    """Hydra multirun overrides → the list of single-run override lists (their cartesian product).
    ends_only: each swept value axis (policy.fallback_threshold=...) keeps only its first and last values
    (first_only: its first); swept groups (task=, pair=, policy=) keep every choice, since each one must compose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(sweep):
        key = o.get_key_element()
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            if (ends_only or first_only) and "." in key:
                values = list(dict.fromkeys([values[0]] if first_only else [values[0], values[-1]]))
        else:
            values = [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def with_tiny(overrides: list[str], tiny: list[str]) -> list[str]:
    """overrides with every key that `tiny` sets replaced by tiny's value."""
    replaced = {_key(t) for t in tiny}
    return [o for o in overrides if _key(o) not in replaced] + list(tiny)


def plan(experiment: str) -> tuple[object, list[list[str]]]:
    """The composed config of an artifact and its sweeps as complete override lists, each starting with
    experiment=...: the artifact's own, or the one the sweep names (a testbed experiment run into the
    artifact's output folder, e.g. PPD's two testbeds)."""
    from bildexp.config import compose_config

    if experiment not in artifacts() and not (EXPERIMENT_DIR / f"{experiment}.yaml").is_file():
        raise BildexpError(f"unknown artifact experiment {experiment!r}: one of {', '.join(artifacts())}, or a "
                           "conf/experiment/<name>.yaml with reproduce.sweeps (qwen25_xsum, ...)")
    cfg = compose_config(f"experiment={experiment}")
    if not cfg.reproduce.sweeps:
        raise BildexpError(f"experiment={experiment} has no reproduce.sweeps: nothing to run")
    sweeps = []
    for line in cfg.reproduce.sweeps:
        sweep = shlex.split(line)
        if sweep and sweep[0].startswith("experiment="):
            sweep = [sweep[0], *sweep[1:], f"runner.output_dir={cfg.runner.output_dir}"]
        else:
            sweep = [f"experiment={experiment}", *sweep]
        sweeps.append(sweep)
    return cfg, sweeps


def run_tiny(experiment: str, output_dir: str | Path, extra: list[str] = (), rehearse: bool = False) -> list[dict]:
    """Every sweep of the artifact in tiny mode, in this process; returns the rows (one per distinct run).
    rehearse: the paper's own pairs and hub data instead of the tiny pairs (`reproduce.rehearse`), after the
    prepare commands shrunk by `reproduce.rehearse_prepare`, each value axis at its first value only; for a
    stand-in HF hub cache (tests/hub_standin.py)."""
    from bildexp.config import compose_config
    from bildexp.models import PairCache
    from bildexp.runner import run

    cfg, sweeps = plan(experiment)
    shrink = [*(cfg.reproduce.rehearse if rehearse else cfg.reproduce.tiny), f"runner.output_dir={output_dir}",
              "runner.progress=false", *extra]
    if rehearse:
        for command in cfg.reproduce.prepare:
            prepare_in_process(shlex.split(command), cfg.reproduce.rehearse_prepare)
    pairs = PairCache()
    # A rehearsal walks the loading route: every task, pair and policy, each value axis at its first value.
    cfgs = [compose_config(*with_tiny(point, shrink))
            for sweep in sweeps for point in expand(sweep, ends_only=True, first_only=rehearse)]
    if cfg.reproduce.interleave:
        from bildexp.runner import run_interleaved

        return run_interleaved(cfgs, pairs)
    rows: dict[str, dict] = {}
    for point_cfg in cfgs:
        row = run(point_cfg, pairs)
        rows[row["run_id"]] = row
    return list(rows.values())


def spreading_launcher(overrides: list[str]) -> str | None:
    """The override choosing a Hydra launcher that spreads points over processes (any but `basic`), if one is given:
    interleaving needs every point in one process."""
    return next((o for o in overrides if o.startswith(("hydra/launcher=", "hydra.launcher."))
                 and o != "hydra/launcher=basic"), None)


def run_interleaved_sweeps(cfg, sweeps: list[list[str]], extra: list[str]) -> list[dict]:
    """Every point of every sweep (with `extra`), composed and checked first, then decoded as one interleaved group."""
    from bildexp.config import compose_point
    from bildexp.models import PairCache
    from bildexp.runner import run_interleaved

    launcher = spreading_launcher(extra)
    if launcher is not None:
        raise BildexpError(f"experiment {cfg.experiment_name} runs interleaved (reproduce.interleave=true), in one "
                           f"process; {launcher} spreads points over processes: drop it")
    cfgs = [compose_point([*point, *extra]) for sweep in sweeps for point in expand(sweep)]
    return run_interleaved(cfgs, PairCache())


def prepare_in_process(command: list[str], shrink: list[str]) -> Path:
    """One `bildexp train ...` prepare command, run here with `shrink`'s overrides replacing its own."""
    from bildexp.config import compose_train_config
    from bildexp.train import train

    if not command or command[0] != "train":
        raise BildexpError(f"cannot rehearse prepare command `{shlex.join(command)}`: only `train` commands run in process")
    return train(compose_train_config(*with_tiny(command[1:], shrink)), "bildexp " + shlex.join(command))


def run_sweeps(experiment: str, extra: list[str], dry_run: bool = False) -> int:
    """`prepare`, then each sweep as `bildexp run -m experiment=... SWEEP EXTRA` in its own process, or (reproduce.interleave)
    every point of every sweep interleaved in this one."""
    cfg, sweeps = plan(experiment)
    bildexp = [sys.executable, "-m", "bildexp.cli"]
    commands = [[*bildexp, *shlex.split(c)] for c in cfg.reproduce.prepare]
    if not cfg.reproduce.interleave:
        commands += [[*bildexp, "run", "-m", *s, *extra] for s in sweeps]
    started = time.perf_counter()
    for i, command in enumerate(commands, 1):
        shown = "bildexp " + shlex.join(command[3:])
        print(f"[{i}/{len(commands)}] {shown}", file=sys.stderr, flush=True)
        if dry_run:
            continue
        code = subprocess.run(command).returncode
        if code:
            print(f"bildexp reproduce: stopped: `{shown}` exited with {code}; the same command resumes",
                  file=sys.stderr)
            return code
    if cfg.reproduce.interleave:
        points = sum(len(expand(s)) for s in sweeps)
        print(f"[{len(commands) + 1}/{len(commands) + 1}] {points} points of {len(sweeps)} sweeps, interleaved in this "
              "process (reproduce.interleave)", file=sys.stderr, flush=True)
        if not dry_run:
            from bildexp.results import summary_table

            print("\n" + summary_table(run_interleaved_sweeps(cfg, sweeps, extra)))
    if not dry_run:
        out = next((o.split("=", 1)[1] for o in reversed(extra) if o.startswith("runner.output_dir=")), cfg.runner.output_dir)
        csv = Path(out) / f"{cfg.experiment_name}.csv"
        ran = f"{len(commands)} commands" + (" and one interleaved group" if cfg.reproduce.interleave else "")
        print(f"{experiment}: {ran} in {time.perf_counter() - started:.0f} s; results: {csv}")
    return 0
