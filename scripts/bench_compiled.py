"""BiLD and speculative decoding on compiled static-cache decoding, against compiled and eager vanilla large.

Every policy runs on `pair.cache=static pair.compile=default` (all graphs compiled before timing), plus vanilla
large on the eager dynamic path (what a user had before); all of them interleaved example by example after a
warm-up, so that drift in machine load hits them alike. Prints per policy: mean ms per example, the speedup over
compiled vanilla large (compiled vs compiled: the paper's comparison) and over eager vanilla large, BLEU, and
how many outputs equal compiled vanilla large's. Threads, dtype, device and versions are printed.

    python scripts/bench_compiled.py --pair t5_multi30k_aligned --limit 200
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bildexp import metrics
from bildexp.config import PolicyConfig
from bildexp.models import load_pair
from bildexp.policies import make_policy
from bildexp.runner import benchmark_inputs
from bildexp.tasks import decode, load_task
from bildexp.timing import interleaved

BILD_POINTS = ((0.3, 1.0), (0.5, 1.0), (0.7, 1.0), (0.5, 2.0), (0.7, 2.0), (0.5, 4.0), (0.9, 10.0))


class OnPair:
    """A policy bound to one pair, so that `timing.interleaved` can mix the eager and the compiled pair."""

    def __init__(self, policy, pair):
        self.policy, self.pair = policy, pair

    def decode(self, _pair, prompt, max_new_tokens):
        return self.policy.decode(self.pair, prompt, max_new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="t5_multi30k", help="experiment config giving the task and split")
    ap.add_argument("--pair", default="t5_multi30k_aligned")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="default", help="pair.compile mode of the static path")
    ap.add_argument("--freeze", action="store_true", help="pair.freeze=true: inductor freezing (prepacked CPU weights)")
    args = ap.parse_args()
    cfg, eager, prompts, header = benchmark_inputs(args.experiment, args.pair, args.limit, args.device)
    compiled = load_pair(dataclasses.replace(cfg.pair, cache="static", compile=args.compile, freeze=args.freeze))
    max_new = cfg.task.max_new_tokens
    print(header + f"; static path: pair.cache=static pair.compile={args.compile} pair.freeze={args.freeze}")

    kinds = {"vanilla-large": dict(name="vanilla"), "vanilla-small": dict(name="vanilla", which="small"),
             **{f"bild-fb{f}-rb{r:g}": dict(name="bild", fallback_threshold=f, rollback_threshold=r) for f, r in BILD_POINTS},
             "speculative-k3": dict(name="speculative", num_draft_tokens=3), "speculative-k5": dict(name="speculative", num_draft_tokens=5)}
    policies = {name: OnPair(make_policy(PolicyConfig(**kw)), compiled) for name, kw in kinds.items()}
    policies["vanilla-large-eager"] = OnPair(make_policy(PolicyConfig(name="vanilla")), eager)
    window = max(p.policy.max_pass_tokens() for p in policies.values())
    print(f"compile before timing: {compiled.prepare_static(prompts, max_new, window)}", flush=True)
    runs = interleaved(policies, eager, prompts, max_new, args.warmup)
    late = compiled.late_compiles()

    refs = [ex.reference for ex in load_task(cfg.task, args.limit).examples]
    base, eager_ms = statistics.mean(runs["vanilla-large"]["ms"]), statistics.mean(runs["vanilla-large-eager"]["ms"])
    print(f"{'policy':<22} {'mean ms':>8} {'vs compiled large':>17} {'vs eager large':>14} {'BLEU':>6}  identical to compiled vanilla-large")
    for name, r in runs.items():
        mean = statistics.mean(r["ms"])
        bleu = metrics.score(cfg.task.metric, [decode(t, eager) for t in r["tokens"]], refs)[cfg.task.metric]
        same = sum(a == b for a, b in zip(r["tokens"], runs["vanilla-large"]["tokens"]))
        print(f"{name:<22} {mean:8.1f} {base / mean:16.2f}x {eager_ms / mean:13.2f}x {bleu:6.2f}  {same}/{len(prompts)}")
    print(f"graphs compiled inside timed examples: {late}")


if __name__ == "__main__":
    main()
