"""Weight-only int4 against a dense GEMM on the dequantized weights, by the number of rows a pass feeds a layer.

torch's int4 CPU kernel reads the codes once per row, so a pass of M rows costs ~M one-row passes; a dense GEMM
reuses each weight across rows. Times one Linear layer of Qwen2.5-0.5B's shapes (the MLP's 896 → 4864 and 4864 → 896,
and the 151,936-row LM head) both ways at M = 1 .. 341 (an XSUM prompt): the crossover that sets
`pair.quant_dense_rows` (bildexp/quant.py). Random bf16 weights (the kernels' cost does not depend on the values).

    OMP_WAIT_POLICY=ACTIVE python scripts/bench_int4_rows.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bildexp.quant import WeightOnlyLinear

SHAPES = [(896, 4864), (4864, 896), (896, 151936)]  # (in, out): MLP up, MLP down, LM head
ROWS = [1, 4, 8, 16, 32, 64, 128, 341]


def _ms(fn, reps: int) -> float:
    fn(), fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, bf16 activations, CPU, int4 group {args.group_size}, torch {torch.__version__}")
    print("| in | out | rows | int4 kernel ms | dense ms | int4 / dense |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for k, n in SHAPES:
            q = WeightOnlyLinear(nn.Linear(k, n, bias=False).to(torch.bfloat16), "int4", args.group_size)
            w = q.dequantize().to(torch.bfloat16)
            for m in ROWS:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                reps = 2 if n > 100_000 else 5
                a, b = _ms(lambda: q(x), reps), _ms(lambda: nn.functional.linear(x, w), reps)
                print(f"| {k} | {n} | {m} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
