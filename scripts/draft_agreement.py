"""Top-1 agreement of a pair's small model, at each weight-only quantization, with the large model's greedy output.

Decodes the first N examples of an experiment's task with the large model (greedy, the pair's dtype), then
teacher-forces those outputs through the small model and counts how often its argmax is the large model's token
(`bildexp.align.top1_agreement`, the measure `bildexp align` reports). Quantizing the draft should leave this
number where it was: only then is a cheaper draft a better one. Untimed.

    python scripts/draft_agreement.py --experiment qwen25_int4_wmt --limit 10 --threads 2 --quants none,int8,int4
    python scripts/draft_agreement.py --experiment qwen25_int4_wmt --limit 10 --threads 2 --quants int4 --group-sizes 128,64,32
    python scripts/draft_agreement.py --experiment qwen25_int4_wmt --limit 10 --threads 2 --quants none,int4 pair=qwen25_int4_aligned
    python scripts/draft_agreement.py --experiment qwen25_int4_wmt --limit 10 --threads 2 --quants int4 --group-sizes 64,32 --head-group-size 128

Trailing KEY=VALUE arguments are config overrides (e.g. another pair: a prediction-aligned draft). `--head-group-size`
quantizes the LM head in int4 groups of its own (the decoder layers take `--group-sizes`), to tell which weights'
rounding costs the agreement.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from bildexp.align import greedy_outputs, top1_agreement
from bildexp.config import compose_config
from bildexp.models import DTYPES, PairCache, load_model, resolve_device
from bildexp.quant import quantize
from bildexp.runner import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="experiment config giving the task, pair and lengths")
    ap.add_argument("--limit", type=int, default=10, help="examples (default 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quants", default="none,int4", help="weight-only quantizations of the small model (default none,int4)")
    ap.add_argument("--group-sizes", default=None,
                    help="int4 group sizes to try, e.g. 128,64,32 (default: the pair's pair.quant_group_size)")
    ap.add_argument("--head-group-size", type=int, default=None,
                    help="int4: the LM head's own group size (default: the pair's pair.quant_head_group_size; "
                         "unset there: the layers' group size)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. pair=qwen25_int4_aligned")
    args = ap.parse_args()
    cfg = compose_config(f"experiment={args.experiment}", *args.overrides, f"runner.limit={args.limit}", f"pair.threads={args.threads}",
                         "pair.small_quant=none", "pair.large_quant=none", "pair.cache=dynamic", "pair.compile=none")
    threads, _, pair, encoded = prepare(cfg, PairCache())
    prompts = [p for p, _ in encoded]
    outputs = greedy_outputs(pair, prompts, cfg.task.max_new_tokens, desc="large greedy", progress=False)
    print(f"pair {cfg.pair.name}, task {cfg.task.name} ({len(prompts)} examples, {sum(map(len, outputs))} tokens), "
          f"dtype {cfg.pair.dtype}, device {pair.device}, threads {threads}")
    groups = [int(g) for g in args.group_sizes.split(",")] if args.group_sizes else [cfg.pair.quant_group_size]
    head_group = args.head_group_size or cfg.pair.quant_head_group_size
    for quant in args.quants.split(","):
        for group in groups if quant == "int4" else [cfg.pair.quant_group_size]:
            small = load_model(cfg.pair.small, DTYPES[cfg.pair.dtype], resolve_device(cfg.pair.device))
            label = f"{quant} g{group}" if quant == "int4" else quant
            if quant == "int4" and head_group:
                label += f", head g{head_group}"
            quantize(small, quant, group, "--quants", head_group_size=head_group)
            print(f"small {label}: top-1 agreement {top1_agreement(small, prompts, outputs):.3f}", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
