"""The `bildexp` command: the only Hydra entry point.

    bildexp run [HYDRA OVERRIDES]     decode a task with a policy, write results/<experiment_name>.csv
    bildexp run -m KEY=A,B ...        sweep (Hydra multirun; jobs share loaded models)
    bildexp train [HYDRA OVERRIDES]   fine-tune or train a model on a task's training split (resumable)
    bildexp align [HYDRA OVERRIDES]   prediction alignment: fine-tune the small model on the large one's outputs
    bildexp plot [--csv F] [--out D] [--baseline-pair P]  Figure-4/baselines views (PNG, PDF), Tables 1, 3-4 (Markdown)
    bildexp build [NAME ...]          build the project's own models: tiny_t5, tiny_llama, smollm2, qwen25
    bildexp reproduce experiment=A/V [--tiny] [--dry-run] [OVERRIDES]  every sweep of one paper artifact (or qwen25_xsum, ...)
    bildexp merge [--dir D]           rebuild each results CSV from its runs' row.json files (no loss, no duplicates)
    bildexp figures [--results D] [--out D]  every paper figure and table from the results CSVs (docs/REPRODUCTION.md)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bildexp.config import CONF_DIR, compose_point

USAGE = __doc__.split("\n\n", 1)[1]


def hydra_entry(config_name: str, prog: str, argv: list[str], body) -> int:
    """Run body(DictConfig) under Hydra with conf/<config_name>.yaml; BildexpError → one line, exit 2."""
    import hydra
    from omegaconf import DictConfig

    from bildexp import BildexpError
    from bildexp.config import register_configs

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def job(dcfg: DictConfig) -> None:
        try:
            body(dcfg)
        except BildexpError as err:
            # Raised past Hydra (SystemExit is not an Exception) so the user sees one line, not a trace.
            print(f"bildexp: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    check_group_choices(argv)
    # Hydra's argparse wants flags before overrides; accept `bildexp run task=x -m a=1,2` too.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    sys.argv = [prog, *flags, *[a for a in argv if a not in flags]]
    try:
        job()
    except SystemExit as stop:  # ours (one-line error) or Hydra's (config error, --help, --cfg)
        if stop.code:
            return int(stop.code) if isinstance(stop.code, int) else 1
    return 0


def run_command(argv: list[str]) -> int:
    from bildexp.config import to_config
    from bildexp.models import PairCache
    from bildexp.runner import run

    pairs = PairCache()  # lives across the jobs of one multirun
    rows: list[dict] = []
    csvs: list[str] = []

    def body(dcfg) -> None:
        cfg = to_config(dcfg)
        rows.append(run(cfg, pairs))
        csv = str(Path(cfg.runner.output_dir) / f"{cfg.experiment_name}.csv")
        if csv not in csvs:
            csvs.append(csv)

    interleaved = check_sweep_points(argv)
    try:
        if interleaved:  # one process, no Hydra launcher; a BildexpError reaches main's one-line handler
            from bildexp.runner import run_interleaved

            rows.extend(run_interleaved(interleaved, pairs))
            csvs.extend(dict.fromkeys(str(Path(c.runner.output_dir) / f"{c.experiment_name}.csv") for c in interleaved))
            code = 0
        else:
            code = hydra_entry("config", "bildexp run", argv, body)
    except KeyboardInterrupt:
        code = 130
        print(f"\nbildexp: interrupted after {len(rows)} finished run(s); the same command resumes "
              f"(finished runs are skipped, a started one continues from its last example)", file=sys.stderr)
    if rows:
        from bildexp.results import summary_table

        print("\n" + summary_table(rows))
        print("\nresults: " + ", ".join(csvs))
    return code


def check_sweep_points(argv: list[str]) -> list | None:
    """Every point composes and validates, and a sweep (-m) checks its output folder, before the first one runs: one
    bad value (policy.fallback_threshold=0.3,1.5,0.6) or a mistyped key (runner.interleav=true) stops it in one line,
    not after the points before it (nor with Hydra's page-long trace). Hydra's own flags (--cfg, --help) go to Hydra.
    → the points' configs when the sweep runs interleaved (runner.interleave=true), else None."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    from bildexp import BildexpError
    from bildexp.reproduce import expand, spreading_launcher
    from bildexp.results import check_output_dir

    check_group_choices(argv)  # an unknown group option (task=foo): its own line, with the choices
    sweep = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))]
    cfgs = []
    for point in expand(overrides) if sweep else [overrides]:
        cfgs.append(compose_point(point))
        if sweep:
            check_output_dir(cfgs[-1].runner.output_dir)  # Hydra makes its sweep folder there first
    if not (sweep and any(c.runner.interleave for c in cfgs)):
        return None
    launcher = spreading_launcher(argv)
    if launcher is not None:
        raise BildexpError(f"runner.interleave=true decodes every point in one process; {launcher} spreads them over "
                           "processes: drop one of the two")
    return cfgs


def train_command(argv: list[str]) -> int:
    from bildexp.config import to_train_config
    from bildexp.train import train

    command = " ".join(["bildexp", "train", *argv])
    return hydra_entry("train", "bildexp train", argv, lambda dcfg: print(train(to_train_config(dcfg), command)))


def align_command(argv: list[str]) -> int:
    from bildexp.align import align
    from bildexp.config import AlignRunConfig, to_train_config

    command = " ".join(["bildexp", "align", *argv])

    def body(dcfg) -> None:
        if dcfg.train.init is None:
            dcfg.train.init = dcfg.pair.small  # alignment fine-tunes the pair's small model
        align(to_train_config(dcfg, AlignRunConfig), command)

    return hydra_entry("align", "bildexp align", argv, body)


def check_group_choices(argv: list[str]) -> None:
    """`task=foo` with no conf/task/foo.yaml → one line listing the choices (Hydra's own is a page)."""
    from bildexp import BildexpError

    for arg in argv:
        m = re.fullmatch(r"(task|pair|policy|runner|experiment|train)=([^,]+(?:,[^,]+)*)", arg)
        if not m:
            continue
        group, values = m.groups()
        known = sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))
        for value in values.split(","):
            if value not in known and value != "null":
                raise BildexpError(f"unknown {group} {value!r}: one of {', '.join(known)}")


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bildexp plot", description="Figure-4 view and Table-1 view from a results CSV.")
    parser.add_argument("--csv", default="results/default.csv", help="results CSV (default: results/default.csv)")
    parser.add_argument("--out", default="results/figures", help="output folder (default: results/figures)")
    parser.add_argument("--baseline-pair", default=None,
                        help="pair whose vanilla-large run every speedup is against (default: the latest of any pair)")
    args = parser.parse_args(argv)
    from bildexp import BildexpError
    from bildexp.plots import make_all

    if not Path(args.csv).is_file():
        raise BildexpError(f"{args.csv} not found: run `bildexp run ...` first or pass --csv PATH")
    for path in make_all(args.csv, args.out, args.baseline_pair):
        print(path)
    return 0


def build_command(argv: list[str]) -> int:
    from bildexp.testbeds import builds

    known = builds()
    parser = argparse.ArgumentParser(
        prog="bildexp build",
        description="Build the project's own models (bildexp/testbeds/) into $BILDEXP_CACHE (default ~/.cache/bildexp); "
        "they are also built on first use, and a rerun does nothing. Pair configs name them builtin:<name>/<role>. "
        "Default: the tiny pairs.",
        epilog="\n".join(f"{name}: {b.about} (roles {', '.join(b.roles)})" for name, b in known.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", default=[n for n, b in known.items() if b.default], choices=list(known))
    for name in parser.parse_args(argv).names:
        print(known[name].build())
    return 0


def reproduce_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bildexp reproduce",
        description="Run every sweep of one paper artifact's experiment config (conf/experiment/<artifact>/<variant>.yaml), "
        "or of a testbed experiment with reproduce.sweeps (conf/experiment/qwen25_xsum.yaml), resumably; extra Hydra "
        "overrides (hydra/launcher=parallel, runner.limit=...) go to every sweep.",
    )
    parser.add_argument("experiment", help="experiment=<artifact>/<offline|paper>, e.g. experiment=bild_fig2/offline, or experiment=qwen25_xsum")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every sweep")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny pairs, a few examples, each axis's ends, into --tiny-dir: checks that the config runs")
    parser.add_argument("--tiny-dir", default="results/tiny", help="output folder of --tiny (default: results/tiny)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    from bildexp import BildexpError
    from bildexp.reproduce import run_sweeps, run_tiny

    if not args.experiment.startswith("experiment="):
        raise BildexpError(f"bildexp reproduce: give the artifact as experiment=<artifact>/<variant>, not {args.experiment!r}")
    experiment = args.experiment.split("=", 1)[1]
    if args.tiny:
        rows = run_tiny(experiment, args.tiny_dir, args.overrides)
        print(f"{experiment}: {len(rows)} tiny runs in {args.tiny_dir}")
        return 0
    return run_sweeps(experiment, args.overrides, args.dry_run)


def merge_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bildexp merge",
        description="Rebuild <experiment>.csv from every runs/<experiment>/*/row.json under --dir: for output folders "
        "copied together from several machines. Rows only in the CSV are kept; no run appears twice.",
    )
    parser.add_argument("--dir", default="results", help="runner.output_dir of the runs (default: results)")
    args = parser.parse_args(argv)
    from bildexp import BildexpError
    from bildexp.results import merge_rows

    if not Path(args.dir).is_dir():
        raise BildexpError(f"no folder {args.dir}: pass --dir, the runner.output_dir of the runs")
    merged = merge_rows(args.dir)
    if not merged:
        print(f"{args.dir}: no runs/<experiment>/*/row.json to merge", file=sys.stderr)
    for csv, n in merged.items():
        print(f"{csv}: {n} rows")
    return 0


def figures_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bildexp figures",
        description="Every paper figure (PNG, PDF) and table (Markdown, LaTeX) from the results CSVs alone, with the "
        "papers' numbers beside ours (docs/REPRODUCTION.md).",
    )
    parser.add_argument("--results", default="results/offline", help="folder of the results CSVs (default: results/offline)")
    parser.add_argument("--out", default="docs/figures/reproduction", help="output folder (default: docs/figures/reproduction)")
    args = parser.parse_args(argv)
    from bildexp.figures import make_figures

    for path in make_figures(args.results, args.out):
        print(path)
    return 0


COMMANDS = {"run": run_command, "train": train_command, "align": align_command, "plot": plot_command, "build": build_command,
            "reproduce": reproduce_command, "merge": merge_command, "figures": figures_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # OpenMP's default spin-wait makes batch-1 decoding jittery on small CPUs (ENVIRONMENT.md); it must
    # be set before torch loads, which is why the heavy imports above are inside the commands.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bildexp import BildexpError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except BildexpError as err:
        print(f"bildexp: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
