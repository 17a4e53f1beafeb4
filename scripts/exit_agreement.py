"""Top-1 agreement of each early exit with the model's own greedy output, per decoder layer.

For every model given, decode the first N examples of a task greedily, then teacher-force those outputs
and count how often the exit after layer l (final norm + shared LM head on the hidden state after l
layers) picks the same token as the last layer. Early-exit training (`train.exit_loss=bild|calm`) is
meant to raise these numbers; untrained exits agree on few tokens.

    python scripts/exit_agreement.py --task multi30k --limit 100 testbeds/t5_multi30k/large testbeds/t5_multi30k/early_exit
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from bildexp.align import greedy_outputs, top1_agreement
from bildexp.config import compose_config
from bildexp.config import PairConfig
from bildexp.layerwise import decoder_layers
from bildexp.layerwise import first_layers
from bildexp.models import load_pair
from bildexp.tasks import encode, load_task
from bildexp.timing import apply_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (or hub ids / builtin:...)")
    ap.add_argument("--task", default="multi30k")
    ap.add_argument("--experiment", default="t5_multi30k", help="experiment config giving the split")
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    cfg = compose_config(f"experiment={args.experiment}", f"task={args.task}")
    threads = apply_threads(1)
    examples = load_task(cfg.task, args.limit).examples
    print(f"task {cfg.task.name} ({len(examples)} examples), fp32, cpu, threads {threads}")
    for name in args.models:
        pair = load_pair(PairConfig(name=name, large=name, small=name))
        prompts = [encode(ex, cfg.task, pair)[0] for ex in examples]
        outputs = greedy_outputs(pair, prompts, cfg.task.max_new_tokens, desc=name, progress=False)
        n = len(decoder_layers(pair.large))
        cells = [f"layer {i}: {top1_agreement(first_layers(pair.large, i), prompts, outputs):.3f}" for i in range(1, n)]
        print(f"{name}: " + ", ".join(cells) + f" (of {sum(map(len, outputs))} tokens)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
