"""Per-step decoder latency of a pair's large and small models: k new tokens per pass, fp32 and bf16, per backend.

BiLD pays off when a small step is much cheaper than a large one AND a k-token large pass costs little
more than one step. This prints both, medians over repetitions after a warm-up, for k = 1, 4, 8, 11, on
each backend (`pair.cache` / `pair.compile` / `pair.freeze`): eager on transformers' DynamicCache, eager on
bildexp's static cache, and compiled on the static cache (inductor on CPU; its padded buckets make k = 11 a
16-token pass), named static-<compile mode>, with -frozen for inductor freezing.
Threads, dtype and device are on every line; compile time is printed apart. A draft can also be made by
slicing the large model's first N decoder layers (`--draft-layers N`, shared head). `--small-quants none,int8,int4`
adds a row block per weight-only quantization of the small model (bildexp/quant.py; `--large-quant` quantizes the
large one), so a quantized draft's step is compared with the full-precision large model's on one backend; `int4-g32`
names an int4 group size of its own (others take `--group-size`), so group sizes compare in one run;
`--head-group-size` gives the int4 draft's LM head groups of their own (the decoder layers keep theirs).

    python scripts/bench_steps.py --pair t5_multi30k --context 12 --source 24
    python scripts/bench_steps.py --pair tiny_t5 --backends dynamic,static-default --dtypes float32
    python scripts/bench_steps.py --pair t5_multi30k_aligned --backends static-default,static-max-autotune-no-cudagraphs-frozen
    python scripts/bench_steps.py --large builtin:smollm2/large --draft-layers 1 --context 256 --backends dynamic
    python scripts/bench_steps.py --pair qwen25 --dtypes bfloat16 --threads 2 --context 64 --ks 1,4 --reps 5 \
        --small-quants none,int4 --backends dynamic,static-default
    python scripts/bench_steps.py --pair qwen25 --dtypes bfloat16 --threads 2 --context 64 --ks 1,4 --reps 5 \
        --small-quants int4-g128,int4-g64,int4-g32 --backends static-default
    python scripts/bench_steps.py --pair qwen25 --dtypes bfloat16 --threads 2 --context 64 --ks 1,4 --reps 5 \
        --small-quants int4-g64 --head-group-size 128 --backends static-default
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bildexp.cache import MAX_BUCKET, ModelState, StaticDecoder
from bildexp.config import COMPILE_MODES
from bildexp.layerwise import first_layers
from bildexp import BildexpError
from bildexp.models import DTYPES, load_model, resolve_device
from bildexp.quant import quantize
from bildexp.timing import synchronize

BACKENDS = "dynamic, static, static-<pair.compile mode>[-frozen] (-frozen: pair.freeze=true)"


def step_ms(model, backend: str, context: int, source: int, k: int, reps: int, static: StaticDecoder | None) -> float:
    """Median ms of one k-token pass after `context` cached decoder tokens (encoder output of `source` tokens)."""
    gen = torch.Generator().manual_seed(0)
    dev = model.device
    enc = torch.randint(5, 200, (1, source), generator=gen).to(dev) if model.config.is_encoder_decoder else None
    vocab = model.config.vocab_size
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        state = ModelState(model, enc, static=static)
        # A long context in one pass, as a prompt fills it (above the largest bucket: uncompiled, not timed); a short one
        # a token at a time, within the compiled buckets.
        fill = [context] if context > MAX_BUCKET else [1] * context
        for n in fill:
            state.advance(torch.randint(5, vocab, (1, n), generator=gen).to(dev))
        for _ in range(2):  # two untimed steps: the first passes after a long fill run slower than decoding's steady state
            state.advance(torch.randint(5, vocab, (1, 1), generator=gen).to(dev))
        new = torch.randint(5, vocab, (1, k), generator=gen).to(dev)
        synchronize(dev)
        t0 = time.perf_counter()
        state.advance(new, keep=k)
        synchronize(dev)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


def parse_backend(backend: str) -> tuple[str, bool] | None:
    """'dynamic' → None; 'static[-<compile mode>][-frozen]' → (compile mode, freeze)."""
    if backend == "dynamic":
        return None
    mode = backend.removeprefix("static").removeprefix("-").removesuffix("-frozen") or "none"
    if not backend.startswith("static") or mode not in COMPILE_MODES:
        raise SystemExit(f"unknown backend {backend!r}: one of {BACKENDS}, modes {', '.join(COMPILE_MODES[1:])}")
    return mode, backend.endswith("-frozen")


def decoder_for(model, backend: str) -> StaticDecoder | None:
    parsed = parse_backend(backend)
    return None if parsed is None else StaticDecoder(model, parsed[0], freeze=parsed[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", help="a pair config name (conf/pair/NAME.yaml)")
    ap.add_argument("--large", help="large model id/folder/builtin (instead of --pair)")
    ap.add_argument("--small", help="small model id/folder/builtin (instead of --pair)")
    ap.add_argument("--draft-layers", type=int, help="measure a draft made of the large model's first N decoder layers")
    ap.add_argument("--context", type=int, default=32, help="decoder tokens already cached (default 32)")
    ap.add_argument("--source", type=int, default=64, help="encoder tokens of an encoder-decoder model (default 64)")
    ap.add_argument("--ks", default="1,4,8,11", help="tokens per pass (default 1,4,8,11)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backends", default="dynamic,static,static-default", help=f"comma-separated: {BACKENDS}")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    ap.add_argument("--small-quants", default="none", help="comma-separated weight-only quantizations of the small "
                    "model, one row block each: none, int8, int4, int4-g<group size> (default none)")
    ap.add_argument("--large-quant", default="none", help="weight-only quantization of the large model (default none)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (pair.quant_group_size, default 128)")
    ap.add_argument("--head-group-size", type=int, default=None,
                    help="int4 drafts: the LM head's own group size (default: the layers' group size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)  # cuda on a machine without one: one line, never a CPU timing
    except BildexpError as err:
        raise SystemExit(f"error: {err}") from None
    large_name, small_name = args.large, args.small
    if args.pair:
        from omegaconf import OmegaConf

        from bildexp.config import CONF_DIR

        pc = OmegaConf.load(CONF_DIR / "pair" / f"{args.pair}.yaml")
        large_name, small_name = pc.large, pc.small
    ks = [int(k) for k in args.ks.split(",")]
    quants = {}  # --small-quants entry → (mode, int4 group size), checked before any model loads
    for quant in args.small_quants.split(","):
        mode, _, group = quant.partition("-g")
        if group and not group.isdigit():
            raise SystemExit(f"--small-quants: {quant!r} is not a quantization (none, int8, int4, int4-g<group size>)")
        quants[quant] = (mode, int(group or args.group_size))
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} device={device} "
          f"context={args.context} source={args.source} reps={args.reps} torch={torch.__version__}")
    print(f"large={large_name} small={'first %d layers of large' % args.draft_layers if args.draft_layers else small_name}"
          + (f" (int4 LM head in groups of {args.head_group_size})" if args.head_group_size else ""))
    print(f"{'dtype':<9} {'small quant':<11} {'backend':<40} {'k':>2} {'large ms':>9} {'small ms':>9} {'large/small':>11} "
          f"{'large k/1':>9}")
    compile_lines = []
    for dtype in args.dtypes.split(","):
        large = load_model(large_name, DTYPES[dtype], device)
        quantize(large, args.large_quant, args.group_size, "--large-quant")
        smalls = {}  # quant → the small model so quantized
        for quant in quants:
            if args.draft_layers:
                smalls[quant] = first_layers(large, args.draft_layers)
                continue
            smalls[quant] = load_model(small_name, DTYPES[dtype], device)
            mode, group = quants[quant]
            quantize(smalls[quant], mode, group, "--small-quants", head_group_size=args.head_group_size)
        for backend in args.backends.split(","):
            decoders = {"large": decoder_for(large, backend), **{q: decoder_for(m, backend) for q, m in smalls.items()}}
            if decoders["large"] is not None:
                for d in decoders.values():  # every shape compiled here, before any timed pass
                    d.reserve(args.context + max(ks) + 16, args.source)
                    d.warmup(max(ks))
                if backend != "static":
                    compile_lines.append(f"{dtype} {backend}: compiled {sum(d.stats.graphs for d in decoders.values())} "
                                         f"graphs in {sum(d.stats.compile_s for d in decoders.values()):.1f} s")
            large_ms = {k: step_ms(large, backend, args.context, args.source, k, args.reps, decoders["large"]) for k in ks}
            for quant, small in smalls.items():
                for k in ks:
                    lm = large_ms[k]
                    sm = step_ms(small, backend, args.context, args.source, k, args.reps, decoders[quant])
                    print(f"{dtype:<9} {quant:<11} {backend:<40} {k:>2} {lm:>9.2f} {sm:>9.2f} {lm / sm:>11.2f} "
                          f"{lm / large_ms[ks[0]]:>9.2f}", flush=True)
            late = sum(d.stats.late for d in decoders.values() if d is not None)
            if late:
                print(f"  warning: {late} graphs compiled inside timed passes", flush=True)
    for line in compile_lines:
        print(line)


if __name__ == "__main__":
    main()
