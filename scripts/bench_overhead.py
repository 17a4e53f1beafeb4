"""Harness overhead: vanilla greedy through bildexp's decode loop vs a bare hand-written loop.

Both loops run the same model on the same input for the same number of tokens (eos disabled), in one
process, interleaved, after a warm-up; the script prints per-token medians and their ratio (target
<= 1.05), with threads, dtype and device. Two backends:
- dynamic: the harness on its default path vs a bare transformers `DynamicCache` loop;
- static (`--static`): the harness with pair.cache=static pair.compile=default vs a bare gpt-fast-style
  loop on transformers' own `StaticCache` with the step `torch.compile`d (fullgraph), compiled before timing.
Models: t5-small-sized and Llama-small-sized configs with random weights (speed does not depend on the
weights), the project's tiny T5 (the worst case: its steps are so short that any fixed per-step cost shows),
and with --static the t5_multi30k testbed's models.

    python scripts/bench_overhead.py [--tokens 64] [--reps 7] [--threads 1] [--static] [--only t5_multi30k]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (DynamicCache, EncoderDecoderCache, LlamaConfig, LlamaForCausalLM, StaticCache, T5Config,
                          T5ForConditionalGeneration)

from bildexp.cache import StaticDecoder
from bildexp.config import PolicyConfig
from bildexp.models import ModelPair, load_model
from bildexp.policies import Prompt, make_policy


@torch.inference_mode()
def bare_loop(model, prompt: Prompt, n: int) -> list[int]:
    """The hand-written reference: one forward per token with the model's own cache, argmax."""
    out_tokens = []
    if model.config.is_encoder_decoder:
        enc = model.get_encoder()(input_ids=prompt.encoder_input_ids)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        tok = torch.tensor([prompt.decoder_prefix])
        for _ in range(n):
            out = model(encoder_outputs=enc, decoder_input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            out_tokens.append(int(tok))
    else:
        cache = DynamicCache()
        tok = torch.tensor([prompt.decoder_prefix])
        for _ in range(n):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            out_tokens.append(int(tok))
    return out_tokens


def _bare_static_step(model, tok, cache, enc):
    # tok: [1, 1] → logits [1, 1, V], written at transformers' StaticCache's own running position
    if enc is None:
        return model(input_ids=tok, cache=cache, use_cache=True).logits
    return model(encoder_outputs=enc, decoder_input_ids=tok, cache=cache, use_cache=True).logits


_compiled_bare_step = torch.compile(_bare_static_step, fullgraph=True, dynamic=False)


@torch.inference_mode()
def bare_static_loop(model, prompt: Prompt, n: int) -> list[int]:
    """gpt-fast's recipe on transformers' StaticCache: the first pass (prompt; cross-attention K/V) eager, each
    later step one compiled call, argmax."""
    length = len(prompt.decoder_prefix) + n + 1
    if model.config.is_encoder_decoder:
        enc = model.get_encoder()(input_ids=prompt.encoder_input_ids)
        cache = EncoderDecoderCache(StaticCache(model.config, max_cache_len=length),
                                    StaticCache(model.config, max_cache_len=prompt.encoder_input_ids.shape[1]))
    else:
        enc, cache = None, StaticCache(model.config, max_cache_len=length)
    logits = _bare_static_step(model, torch.tensor([prompt.decoder_prefix]), cache, enc)
    out_tokens = []
    for _ in range(n):
        tok = logits[:, -1:].argmax(-1)
        out_tokens.append(int(tok))
        logits = _compiled_bare_step(model, tok, cache, enc)
    return out_tokens


def harness_loop(model, prompt: Prompt, n: int, static: StaticDecoder | None = None) -> list[int]:
    pair = ModelPair(model, model, None, bool(model.config.is_encoder_decoder), (), 0, torch.device("cpu"), torch.float32)
    if static is not None:
        pair.static = {"large": static}
    return make_policy(PolicyConfig(name="vanilla", which="large")).decode(pair, prompt, n).tokens


def bench(name: str, model, prompt: Prompt, n: int, reps: int, static: bool = False) -> tuple[float, float]:
    if static:
        decoder = StaticDecoder(model, "default")
        decoder.reserve(len(prompt.decoder_prefix) + n + 1, 0 if prompt.encoder_input_ids is None else prompt.encoder_input_ids.shape[1])
        decoder.warmup(1)
        bare_fn, ours_fn = bare_static_loop, lambda m, p, k: harness_loop(m, p, k, decoder)
    else:
        bare_fn, ours_fn = bare_loop, harness_loop
    # The first calls compile (static); the two loops must agree token for token.
    assert bare_fn(model, prompt, n) == ours_fn(model, prompt, n), "the two loops must produce the same tokens"
    bare, ours = [], []
    for _ in range(reps):  # interleaved so drifts in machine speed hit both alike
        for fn, sink in ((bare_fn, bare), (ours_fn, ours)):
            t0 = time.perf_counter()
            fn(model, prompt, n)
            sink.append((time.perf_counter() - t0) * 1000 / n)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{name:<22} {b:>9.3f} {o:>11.3f} {o / b:>7.3f}")
    return b, o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--static", action="store_true", help="static cache + torch.compile on both sides")
    ap.add_argument("--only", help="run only the models whose name contains this (e.g. t5_multi30k)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = torch.randint(5, 1000, (1, 48))
    models = {
        "t5-small-size (rand)": (T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8, decoder_start_token_id=0)), Prompt([0], src)),
        "llama-60M-size (rand)": (LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)), Prompt(src[0].tolist())),
        "tiny_t5 large": (load_model("builtin:tiny_t5/large", torch.float32, torch.device("cpu")), Prompt([0], src % 300 + 3)),
    }
    if args.static:
        for role in ("large", "small"):
            models[f"t5_multi30k {role}"] = (load_model(f"testbeds/t5_multi30k/{role}", torch.float32, torch.device("cpu")), Prompt([0], src[:, :24] % 7000 + 3))
    backend = "static cache + torch.compile (inductor)" if args.static else "dynamic cache, eager"
    print(f"threads={torch.get_num_threads()} dtype=float32 device=cpu tokens={args.tokens} reps={args.reps} torch={torch.__version__} "
          f"backend: {backend}")
    print(f"{'model':<22} {'bare ms/tok':>9} {'harness ms/tok':>11} {'ratio':>7}")
    for name, (model, prompt) in models.items():
        if args.only and args.only not in name:
            continue
        bench(name, model.eval(), prompt, args.tokens, args.reps, args.static)


if __name__ == "__main__":
    main()
