"""Measured PPD latency and compute against vanilla greedy decoding, next to Theorem 4.1's prediction.

For each early-prediction layer d̄ and candidate count k, policy=ppd decodes the same examples as vanilla
(interleaved example by example after a warm-up, so machine drift hits all alike) and the script prints:
the wall-clock ratio to vanilla, whether outputs are identical, the measured match rate p, Theorem 4.1's
latency ratio at that p (critical-path layers / d per token) and compute ratio (layer-forwards / d per
token). "layer-wise vanilla" (CALM that never exits) runs the decoder one layer at a time like PPD does,
to separate the cost of layer-wise execution from PPD's own.

    python scripts/bench_ppd.py --experiment t5_multi30k --pair t5_multi30k --layers 2,3 --limit 100
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bildexp.config import PolicyConfig
from bildexp.layerwise import decoder_layers
from bildexp.policies import make_policy
from bildexp.runner import benchmark_inputs
from bildexp.timing import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="t5_multi30k")
    ap.add_argument("--pair", default="t5_multi30k")
    ap.add_argument("--layers", default="2,3", help="early-prediction layers d̄ (>= d/2)")
    ap.add_argument("--ks", default="1,3,5")
    ap.add_argument("--sequential", action="store_true", help="also run the candidates after the main token (no 2nd thread)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    cfg, pair, prompts, header = benchmark_inputs(args.experiment, args.pair, args.limit, args.device)
    max_new = cfg.task.max_new_tokens
    print(f"{header}; threads per Python thread (PPD's candidates use a second one), cpus {os.cpu_count()}")

    policies = {"vanilla": make_policy(PolicyConfig(name="vanilla")),
                "layer-wise vanilla": make_policy(PolicyConfig(name="calm", exit_threshold=1.0, exit_decay=0.0))}
    for layer in (int(x) for x in args.layers.split(",")):
        for k in (int(x) for x in args.ks.split(",")):
            policies[f"ppd d̄={layer} k={k}"] = make_policy(PolicyConfig(name="ppd", ppd_layer=layer, ppd_top_k=k))
            if args.sequential:
                policies[f"ppd d̄={layer} k={k} seq"] = make_policy(PolicyConfig(name="ppd", ppd_layer=layer, ppd_top_k=k, ppd_parallel=False))
    runs = interleaved(policies, pair, prompts, max_new, args.warmup)
    ms = {name: r["ms"] for name, r in runs.items()}
    out = {name: r["tokens"] for name, r in runs.items()}
    counters = {name: r["counters"] for name, r in runs.items()}

    # FLOPs ≈ 2 × the parameters a forward touches (attention-score FLOPs ignored): per token-layer forward,
    # and per LM-head pass (vanilla: one per token; ppd: the exit at d̄ and the final one).
    layer_params = sum(p.numel() for p in decoder_layers(pair.large)[0].parameters())
    head_params = pair.large.get_output_embeddings().weight.numel()
    d = len(decoder_layers(pair.large))
    base = statistics.mean(ms["vanilla"])
    print(f"\nFLOPs per output token ≈ 2 × (layer-forwards × {layer_params / 1e6:.2f} M + head passes × {head_params / 1e6:.2f} M)")
    print("\n| policy | mean ms | vs vanilla (measured) | identical | match rate p | Theorem 4.1 latency | Theorem 4.1 compute | MFLOPs / token |")
    print("|---|---|---|---|---|---|---|---|")
    for name in policies:
        c = counters[name]
        same = sum(a == b for a, b in zip(out[name], out["vanilla"]))
        mean = statistics.mean(ms[name])
        tokens = sum(map(len, out[name]))
        if "ppd_steps" in c:
            theory = (f"{c['ppd_adopted'] / max(c['ppd_chances'], 1):.3f} | {c['critical_layers'] / c['vanilla_layers']:.3f}x | "
                      f"{c['layer_forwards'] / c['vanilla_layers']:.2f}x")
            flops = 2 * (c["layer_forwards"] * layer_params + 2 * c["ppd_steps"] * head_params) / tokens
        else:
            theory = "— | 1.000x | 1.00x"
            flops = 2 * (d * layer_params + head_params)
        print(f"| {name} | {mean:.1f} | {mean / base:.3f}x | {same}/{len(prompts)} | {theory} | {flops / 1e6:.1f} |")


if __name__ == "__main__":
    main()
