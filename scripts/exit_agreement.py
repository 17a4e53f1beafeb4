"""Top-1 agreement of each early exit with the model's own greedy output, per decoder layer.

For every model given, decode the first N examples of a task greedily, then teacher-force those outputs
and count how often the exit after layer l (final norm + shared LM head on the hidden state after l
layers) picks the same token as the last layer. Early-exit training (`train.exit_loss=bild|calm`) is
meant to raise these numbers; untrained exits agree on few tokens.

    python scripts/exit_agreement.py --task multi30k --limit 100 testbeds/t5_multi30k/large testbeds/t5_multi30k/early_exit
    python scripts/exit_agreement.py --task wmt --experiment qwen25_wmt --limit 10 --threads 2 --draft builtin:qwen25/small builtin:qwen25/large
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
from bildexp.layerwise import decoder_layers
from bildexp.layerwise import first_layers
from bildexp.models import assemble_pair, load_model, load_tokenizer
from bildexp.tasks import encode, load_task
from bildexp.timing import apply_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (or hub ids / builtin:...)")
    ap.add_argument("--task", default="multi30k")
    ap.add_argument("--experiment", default="t5_multi30k", help="experiment config giving the split")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft", help="a separate draft model (folder, hub id or builtin:...): its top-1 agreement with "
                    "each model's greedy output is printed beside the exits")
    args = ap.parse_args()
    cfg = compose_config(f"experiment={args.experiment}", f"task={args.task}")
    threads = apply_threads(args.threads)
    examples = load_task(cfg.task, args.limit).examples
    print(f"task {cfg.task.name} ({len(examples)} examples), fp32, cpu, threads {threads}")
    draft = load_model(args.draft, torch.float32, torch.device("cpu")) if args.draft else None
    for name in args.models:
        model = load_model(name, torch.float32, torch.device("cpu"))
        pair = assemble_pair(name, model, model, load_tokenizer(name), model.device, torch.float32)
        prompts = [encode(ex, cfg.task, pair)[0] for ex in examples]
        outputs = greedy_outputs(pair, prompts, cfg.task.max_new_tokens, desc=name, progress=False)
        n = len(decoder_layers(pair.large))
        cells = [f"layer {i}: {top1_agreement(first_layers(model, i, share=True), prompts, outputs):.3f}" for i in range(1, n)]
        print(f"{name}: " + ", ".join(cells) + f" (of {sum(map(len, outputs))} tokens)")
        if draft is not None:
            print(f"{args.draft} on {name}'s outputs: {top1_agreement(draft, prompts, outputs):.3f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
