"""Per-step decoder latency of a pair's large and small models: k new tokens per pass, fp32 and bf16.

BiLD pays off when a small step is much cheaper than a large one AND a k-token large pass costs little
more than one step. This prints both, medians over repetitions after a warm-up, for k = 1, 4, 8, with
threads, dtype and device on every line. A draft can also be made by slicing the large model's first
N decoder layers (`--draft-layers N`, shared head) to see what such a draft could save.

    python scripts/bench_steps.py --pair tiny_t5
    python scripts/bench_steps.py --large builtin:smollm2/large --draft-layers 1 --context 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bildexp.cache import ModelState
from bildexp.models import DTYPES, first_layers, load_model


def step_ms(model, context: int, k: int, reps: int) -> float:
    """Median ms of one k-token pass after `context` cached decoder tokens."""
    enc = torch.randint(5, 200, (1, 64)) if model.config.is_encoder_decoder else None
    vocab = model.get_output_embeddings().weight.shape[0]
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        state = ModelState(model, enc)
        state.advance(torch.randint(5, vocab, (1, context)))
        new = torch.randint(5, vocab, (1, k))
        t0 = time.perf_counter()
        state.advance(new, keep=k)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", help="a pair config name (conf/pair/NAME.yaml)")
    ap.add_argument("--large", help="large model id/folder/builtin (instead of --pair)")
    ap.add_argument("--small", help="small model id/folder/builtin (instead of --pair)")
    ap.add_argument("--draft-layers", type=int, help="measure a draft made of the large model's first N decoder layers")
    ap.add_argument("--context", type=int, default=32, help="decoder tokens already cached (default 32)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    large_name, small_name = args.large, args.small
    if args.pair:
        from omegaconf import OmegaConf

        from bildexp.cli import CONF_DIR

        pc = OmegaConf.load(CONF_DIR / "pair" / f"{args.pair}.yaml")
        large_name, small_name = pc.large, pc.small
    print(f"threads={torch.get_num_threads()} device=cpu context={args.context} reps={args.reps} torch={torch.__version__}")
    print(f"large={large_name} small={'first %d layers of large' % args.draft_layers if args.draft_layers else small_name}")
    print(f"{'dtype':<9} {'k':>2} {'large ms':>9} {'small ms':>9} {'large/small':>11} {'large k/1':>9}")
    for dtype in args.dtypes.split(","):
        large = load_model(large_name, DTYPES[dtype], torch.device("cpu"))
        small = first_layers(large, args.draft_layers) if args.draft_layers else load_model(small_name, DTYPES[dtype], torch.device("cpu"))
        one = None
        for k in (1, 4, 8):
            lm, sm = step_ms(large, args.context, k, args.reps), step_ms(small, args.context, k, args.reps)
            one = one or lm
            print(f"{dtype:<9} {k:>2} {lm:>9.2f} {sm:>9.2f} {lm / sm:>11.2f} {lm / one:>9.2f}")


if __name__ == "__main__":
    main()
