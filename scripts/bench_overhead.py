"""Harness overhead: vanilla greedy through bildexp's decode loop vs a bare `past_key_values` loop.

Both loops run the same model on the same input for the same number of tokens (eos disabled), in one
process, interleaved, after a warm-up; the script prints per-token medians and their ratio (target
<= 1.05), with threads, dtype and device. Models: t5-small-sized and Llama-small-sized configs with
random weights (speed does not depend on the weights), and the project's tiny T5 (the worst case:
its steps are so short that any fixed per-step cost shows).

    python scripts/bench_overhead.py [--tokens 64] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache, EncoderDecoderCache, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

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


def harness_loop(model, prompt: Prompt, n: int) -> list[int]:
    pair = ModelPair(model, model, None, bool(model.config.is_encoder_decoder), (), 0, torch.device("cpu"), torch.float32)
    return make_policy(PolicyConfig(name="vanilla", which="large")).decode(pair, prompt, n).tokens


def bench(name: str, model, prompt: Prompt, n: int, reps: int) -> tuple[float, float]:
    assert bare_loop(model, prompt, n) == harness_loop(model, prompt, n), "the two loops must produce the same tokens"
    bare, ours = [], []
    for _ in range(reps):  # interleaved so drifts in machine speed hit both alike
        for fn, sink in ((bare_loop, bare), (harness_loop, ours)):
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = torch.randint(5, 1000, (1, 48))
    models = {
        "t5-small-size (rand)": (T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8, decoder_start_token_id=0)), Prompt([0], src)),
        "llama-60M-size (rand)": (LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)), Prompt(src[0].tolist())),
        "tiny_t5 large": (load_model("builtin:tiny_t5/large", torch.float32, torch.device("cpu")), Prompt([0], src % 300 + 3)),
    }
    print(f"threads={torch.get_num_threads()} dtype=float32 device=cpu tokens={args.tokens} reps={args.reps} torch={torch.__version__}")
    print(f"{'model':<22} {'bare ms/tok':>9} {'harness ms/tok':>11} {'ratio':>7}")
    for name, (model, prompt) in models.items():
        bench(name, model.eval(), prompt, args.tokens, args.reps)


if __name__ == "__main__":
    main()
