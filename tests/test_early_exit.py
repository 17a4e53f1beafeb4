"""Layer-wise execution, CALM, BiLD's early-exit variant and early-exit training, on both tiny pairs (fp32).

Lossless settings are checked token for token against the large model's greedy `generate()`; the
non-lossless ones are checked to really exit early / accept first-layer tokens, so no test passes
because nothing happened.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bildexp.train as train_mod
from bildexp import BildexpError
from bildexp.cache import ModelState
from bildexp.config import PolicyConfig
from bildexp.layerwise import LayerwiseDecoder, SharedLayers, decoder_layers
from bildexp.layerwise import first_layers
from bildexp.models import load_pair
from bildexp.policies import make_policy

from conftest import make_config
from test_exactness import MAX_NEW, hf_greedy, prompts


@pytest.fixture(scope="module")
def setup(tiny_pair, toy_examples):
    ps = prompts(tiny_pair, toy_examples, make_config().task)
    return tiny_pair, ps, [hf_greedy(tiny_pair.large, tiny_pair, p) for p in ps]


@pytest.fixture(scope="module")
def early_exit_pair(setup):
    """The large model of the tiny pair as an early-exit pair: its first layer is the small model."""
    pair = setup[0]
    return dataclasses.replace(pair, small=pair.large, small_layers=1)


def encoder_ids(pair, prompt):
    return prompt.encoder_input_ids if pair.is_encoder_decoder else None


def test_all_layers_reproduce_the_models_logits(setup):
    pair, ps, _ = setup
    for prompt in ps[:4]:
        tokens = torch.tensor([prompt.decoder_prefix + list(range(5, 12))])  # [1, k]
        ref, lw = ModelState(pair.large, encoder_ids(pair, prompt)), LayerwiseDecoder(pair.large, encoder_ids(pair, prompt))
        k = tokens.shape[1]
        # A multi-token pass, then one token, then a pass after a crop: every cache path.
        torch.testing.assert_close(lw.logits(tokens[:, : k - 3]), ref.advance(tokens[:, : k - 3], keep=k - 3), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lw.logits(tokens[:, k - 3 : k - 2]), ref.advance(tokens[:, k - 3 : k - 2]), atol=1e-5, rtol=1e-5)
        lw.crop(k - 4)
        ref.rollback(k - 4)
        torch.testing.assert_close(lw.logits(tokens[:, k - 4 :]), ref.advance(tokens[:, k - 4 :], keep=4), atol=1e-5, rtol=1e-5)
        # Layer slices run separately give the same hidden state as one run.
        a, b = LayerwiseDecoder(pair.large, encoder_ids(pair, prompt)), LayerwiseDecoder(pair.large, encoder_ids(pair, prompt))
        one = a.run(a.embed(tokens), 0, a.n_layers)
        two = b.run(b.run(b.embed(tokens), 0, 1), 1, b.n_layers)
        torch.testing.assert_close(one, two)


def test_state_propagation_fills_the_skipped_layers(setup):
    pair, ps, _ = setup
    prompt = ps[0]
    lw, full = LayerwiseDecoder(pair.large, encoder_ids(pair, prompt)), LayerwiseDecoder(pair.large, encoder_ids(pair, prompt))
    tokens = torch.tensor([prompt.decoder_prefix])
    lw.propagate(lw.run(lw.embed(tokens), 0, 1), 1, lw.n_layers)  # exit after the first layer
    full.logits(tokens)
    assert lw.lengths == [tokens.shape[1]] * lw.n_layers
    kv = lambda dec, i: torch.cat([dec.self_cache.layers[i].keys, dec.self_cache.layers[i].values])  # noqa: E731
    # The layer right after the exit gets its true input, so its K/V are exact; deeper layers get the copied
    # state instead of their true input, so theirs differ (CALM's approximation is real).
    torch.testing.assert_close(kv(lw, 1), kv(full, 1))
    for i in range(2, lw.n_layers):
        assert not torch.allclose(kv(lw, i), kv(full, i))


@pytest.mark.parametrize("measure", ["state", "softmax_max", "softmax_diff"])
def test_calm_that_never_exits_equals_greedy(setup, measure):
    pair, ps, large_ref = setup
    policy = make_policy(PolicyConfig(name="calm", confidence_measure=measure, exit_threshold=1.0, exit_decay=0.0))
    got = [policy.decode(pair, p, MAX_NEW) for p in ps]
    assert [g.tokens for g in got] == large_ref
    n = len(LayerwiseDecoder(pair.large, encoder_ids(pair, ps[0])).layers)
    assert all(g.counters[f"exit_at_{n}"] == g.counters["exits_total"] == len(g.tokens) for g in got)


def test_calm_exits_early_with_a_low_threshold(setup):
    pair, ps, _ = setup
    n = len(LayerwiseDecoder(pair.large, encoder_ids(pair, ps[0])).layers)
    policy = make_policy(PolicyConfig(name="calm", confidence_measure="softmax_max", exit_threshold=0.3, exit_decay=2.0))
    got = [policy.decode(pair, p, MAX_NEW) for p in ps]
    early = [g.counters["exits_total"] - g.counters.get(f"exit_at_{n}", 0) for g in got]
    assert sum(early) > 0
    # Early-exited tokens are marked S (not the full model), full-depth ones L.
    assert [g.provenance.count("S") for g in got] == early
    assert all(g.counters["exit_layer_sum"] < n * g.counters["exits_total"] for g, e in zip(got, early) if e)


def test_calm_threshold_decays(setup):
    from bildexp.policies.base import Sequence

    policy = make_policy(PolicyConfig(name="calm", exit_threshold=0.8, exit_decay=4.0))
    seq = Sequence(tokens=[0], prefix_len=1, max_new_tokens=10, eos_ids=(1,), device=torch.device("cpu"))
    assert policy.threshold(seq) == pytest.approx(0.9 * 0.8 + 0.1)
    seq.tokens += [5] * 10
    assert policy.threshold(seq) == pytest.approx(0.9 * 0.8 + 0.1 * torch.exp(torch.tensor(-4.0)).item())


@pytest.mark.parametrize("fallback", [0.0, 0.5, 0.9])
def test_bild_early_exit_rollback_zero_equals_large(setup, early_exit_pair, fallback):
    _, ps, large_ref = setup
    policy = make_policy(PolicyConfig(name="bild", fallback_threshold=fallback, rollback_threshold=0.0))
    got = [policy.decode(early_exit_pair, p, MAX_NEW) for p in ps]
    assert [g.tokens for g in got] == large_ref
    if fallback == 0.0:  # not vacuous: first-layer tokens were kept and some were rolled back
        assert sum(g.counters.get("small_tokens", 0) for g in got) > 0
        assert sum(g.counters.get("rollbacks", 0) for g in got) > 0


def test_early_exit_small_model_is_the_first_layers(setup, early_exit_pair):
    """Vanilla-small on an early-exit pair = greedy decoding of a copy of the large model cut to one layer."""
    pair, ps, _ = setup
    got = [make_policy(PolicyConfig(name="vanilla", which="small")).decode(early_exit_pair, p, MAX_NEW).tokens for p in ps]
    assert got == [hf_greedy(first_layers(pair.large, 1), pair, p) for p in ps]


def test_shared_layers_run_each_layer_once_per_token(setup):
    """The large pass after small steps runs only the upper layers, and rollback keeps lengths consistent."""
    pair, ps, _ = setup
    prompt = ps[0]
    shared = SharedLayers(pair.large, 1, encoder_ids(pair, prompt))
    toks = torch.tensor([prompt.decoder_prefix + [5, 6, 7]])  # [1, k]
    k = toks.shape[1]
    shared.small.advance(toks[:, : k - 1])
    assert (shared.small.length, shared.large.length) == (k - 1, 0)
    logits = shared.large.advance(toks, keep=k)  # the last token has not been through layer 0 yet
    ref = ModelState(pair.large, encoder_ids(pair, prompt)).advance(toks, keep=k)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert shared.dec.lengths == [k] * shared.dec.n_layers and shared.pending.shape[1] == 0
    shared.large.rollback(k - 2)
    assert shared.dec.lengths == [k - 2] * shared.dec.n_layers


def test_early_exit_layers_out_of_range_is_one_line():
    with pytest.raises(BildexpError, match="small_layers=9 must be in"):
        load_pair(make_config("pair=tiny_t5", "pair.early_exit.small_layers=9").pair)


@pytest.mark.parametrize("kind", ["bild", "calm"])
def test_exit_losses_are_the_weighted_layer_losses(tiny_pair, toy_examples, kind):
    """BiLD: 1/2 (L_1 + L_last); CALM: sum_i i/sum(j) L_i, with L_i the loss of the model cut to i layers."""
    model = tiny_pair.large
    task = make_config().task
    items = train_mod.encode_examples(toy_examples[:4], task, tiny_pair, 48)
    batch = train_mod.collate(items, train_mod.pad_token(tiny_pair), tiny_pair.device)
    n = len(LayerwiseDecoder(model, torch.tensor([[5, 1]]) if tiny_pair.is_encoder_decoder else None).layers)
    with torch.no_grad():
        per_layer = {i: train_mod.loss_of(first_layers(model, i) if i < n else model, batch) for i in range(1, n + 1)}
        got = train_mod.exit_loss_of(model, batch, kind, exit_layer=1)
    weights = {1: 0.5, n: 0.5} if kind == "bild" else {i: i / (n * (n + 1) / 2) for i in range(1, n + 1)}
    torch.testing.assert_close(got, sum(w * per_layer[i] for i, w in weights.items()), atol=1e-5, rtol=1e-5)


def test_runner_rows_for_calm_and_early_exit(tmp_path, pair_name):
    """The real configs end to end: CALM reports its exit layers; an early-exit pair is its own run id."""
    from bildexp.models import PairCache
    from bildexp.runner import run

    common = (f"pair={pair_name}", f"runner.output_dir={tmp_path}", "runner.limit=3", "runner.warmup=0",
              "runner.progress=false", "task.max_new_tokens=24")
    pairs = PairCache()
    row = run(make_config(*common, "policy=calm", "policy.confidence_measure=softmax_max", "policy.exit_threshold=0.3"), pairs)
    n_layers = len(decoder_layers(pairs.get(make_config(*common).pair).large))
    assert 1 <= row["mean_exit_layer"] < n_layers
    assert sum(int(c.split(":")[1]) for c in row["exit_layer_histogram"].split()) == row["exits_total"] == row["output_tokens"]
    ee = run(make_config(*common, "policy=bild", "pair.early_exit.small_layers=1"), pairs)
    plain = run(make_config(*common, "policy=bild"), pairs)
    assert ee["small_layers"] == 1 and "small_layers" not in plain
    assert ee["run_id"] != plain["run_id"]


def _random_model(kind: str):
    """Tiny random-init models of the other supported families (logit equality needs no training)."""
    from transformers import MT5Config, MT5ForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "mt5":  # gated-GELU feed-forward, untied head (no output rescaling)
        cfg = MT5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=4,
                        decoder_start_token_id=0, tie_word_embeddings=False)
        return MT5ForConditionalGeneration(cfg).eval()
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["mt5", "qwen2"])
def test_layerwise_supports_mt5_and_other_llama_family_models(kind):
    model = _random_model(kind)
    enc = torch.tensor([[5, 6, 7, 1]]) if kind == "mt5" else None
    tokens = torch.tensor([[0, 9, 10, 11, 12]])
    ref, lw = ModelState(model, enc), LayerwiseDecoder(model, enc)
    torch.testing.assert_close(lw.logits(tokens[:, :3]), ref.advance(tokens[:, :3], keep=3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lw.logits(tokens[:, 3:]), ref.advance(tokens[:, 3:], keep=2), atol=1e-5, rtol=1e-5)
    # State propagation (with the model's own rotary embedding for Qwen2) fills every layer.
    prop = LayerwiseDecoder(model, enc)
    prop.propagate(prop.run(prop.embed(tokens[:, :1]), 0, 1), 1, prop.n_layers)
    assert prop.lengths == [1] * prop.n_layers
    assert prop.logits(tokens[:, 1:2]).shape == (1, 64)


def test_unsupported_model_type_is_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(BildexpError, match="supports t5, mt5, llama, qwen2 models, not gpt2"):
        LayerwiseDecoder(model)


def test_trained_exit_heads_replace_the_shared_head(setup):
    pair, ps, _ = setup
    lw = LayerwiseDecoder(pair.large, encoder_ids(pair, ps[0]), heads={1: lambda h: h.sum(-1, keepdim=True)})
    h = lw.run(lw.embed(torch.tensor([ps[0].decoder_prefix])), 0, 1)
    torch.testing.assert_close(lw.head(h, layer=1), h.sum(-1, keepdim=True))
    assert lw.head(h, layer=2).shape[-1] == pair.large.get_output_embeddings().weight.shape[0]


def test_self_speculation_on_an_early_exit_pair_equals_greedy(setup, early_exit_pair):
    """Speculative decoding with the first layer as the draft (LayerSkip-style) over the shared cache."""
    _, ps, large_ref = setup
    got = [make_policy(PolicyConfig(name="speculative", num_draft_tokens=3)).decode(early_exit_pair, p, MAX_NEW) for p in ps]
    assert [g.tokens for g in got] == large_ref
    assert sum(g.counters["accepted_tokens"] for g in got) > 0 and sum(g.counters["tokens_rolled_back"] for g in got) > 0
