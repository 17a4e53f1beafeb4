"""PPD's latency/compute model (Theorem 4.1, Equations 2, 4, 6) against a Monte-Carlo simulation of the pipeline."""

from __future__ import annotations

import pytest

from bildexp import ppd

GRID = [(d, dbar, ell, p, k) for d, dbar in ((4, 2), (40, 20), (30, 20)) for ell in (8, 64)
        for p in (0.0, 0.3, 0.7, 1.0) for k in (1, 3, 5)]


@pytest.mark.parametrize("d,dbar,ell,p,k", GRID)
def test_simulation_agrees_with_theorem_4_1_within_2_percent(d, dbar, ell, p, k):
    latency, compute = ppd.simulate(d, dbar, ell, p, k, trials=4000, seed=1)
    assert latency == pytest.approx(ppd.expected_latency(d, dbar, ell, p), rel=0.02)
    assert compute == pytest.approx(ppd.expected_compute(d, dbar, ell, p, k), rel=0.02)


def test_theorem_corner_cases():
    # Never correct: every token costs d; always correct: one run of d + (ℓ - 1) d̄.
    assert ppd.expected_latency(40, 20, 10, 0.0) == 400
    assert ppd.expected_latency(40, 30, 10, 1.0) == 40 + 9 * 30
    assert ppd.simulate(40, 30, 10, 1.0, 3, trials=10) == (40 + 9 * 30, pytest.approx(ppd.expected_compute(40, 30, 10, 1.0, 3)))


@pytest.mark.parametrize("p,k", [(0.1, 1), (0.5, 3), (0.9, 5)])
def test_equations_2_4_6_are_the_theorem_for_long_sequences_at_half_depth(p, k):
    d, ell = 40, 10**6
    lat, comp = ppd.expected_latency(d, d / 2, ell, p), ppd.expected_compute(d, d / 2, ell, p, k)
    assert lat / (d * ell) == pytest.approx(ppd.latency_per_token(p), rel=1e-4)
    assert comp / lat == pytest.approx(ppd.compute_per_time(p, k), rel=1e-4)
    assert comp / (d * ell) == pytest.approx(ppd.compute_per_token(p, k), rel=1e-4)


def test_paper_figure_2_example():
    """Paper: SQUAD, trained heads, k = 3, d̄ = 20 of 40 (p = 68.37%): latency −34%, "3.2 times" the compute (3.28)."""
    assert ppd.latency_per_token(0.6837) == pytest.approx(0.66, abs=0.005)
    assert ppd.compute_per_time(0.6837, 3) == pytest.approx(3.28, abs=0.005)


def test_trade_off_figure_has_both_panels():
    fig = ppd.trade_off_figure({"multi30k layer 2": {1: 0.5, 3: 0.7, 5: 0.8}})
    points = [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes]
    assert len(fig.axes) == 2 and points == [3, 3]  # one point per k in each panel


# ------------------------------------------------------------------------------ match rates (policy=ppd_match)
def test_ppd_match_decodes_greedily_and_counts_exit_agreement(tiny_pair, toy_examples):
    """ppd_match's output is the large model's greedy output, and its top-1 rate at layer l is the agreement
    of the model cut to l layers with that output (teacher-forced): the same event, counted another way."""
    import torch

    from bildexp.align import top1_agreement
    from bildexp.config import PolicyConfig
    from bildexp.layerwise import decoder_layers
    from bildexp.layerwise import first_layers
    from bildexp.policies import make_policy

    from conftest import make_config
    from test_exactness import MAX_NEW, hf_greedy, prompts

    ps = prompts(tiny_pair, toy_examples, make_config().task)
    n = len(decoder_layers(tiny_pair.large))
    vocab = tiny_pair.large.get_output_embeddings().weight.shape[0]
    policy = make_policy(PolicyConfig(name="ppd_match", match_top_k=[1, 2, vocab]))
    gens = [policy.decode(tiny_pair, p, MAX_NEW) for p in ps]
    assert [g.tokens for g in gens] == [hf_greedy(tiny_pair.large, tiny_pair, p) for p in ps]
    total = lambda key: sum(g.counters.get(key, 0) for g in gens)  # noqa: E731
    steps = total("match_steps")
    assert steps == sum(len(g.tokens) for g in gens)
    for layer in range(1, n):
        with torch.inference_mode():
            agreement = top1_agreement(first_layers(tiny_pair.large, layer), ps, [g.tokens for g in gens])
        assert total(f"match_l{layer}_k1") / steps == pytest.approx(agreement, abs=1e-9)
        assert total(f"match_l{layer}_k1") <= total(f"match_l{layer}_k2") <= total(f"match_l{layer}_k{vocab}") == steps
    # Buckets partition the steps.
    assert sum(total(f"match_steps_p{b}") for b in range(8)) == steps


def test_match_tables_from_a_csv(tmp_path, pair_name):
    from bildexp import plots
    from bildexp.models import PairCache
    from bildexp.runner import run

    from conftest import make_config

    cfg = make_config(f"pair={pair_name}", "policy=ppd_match", f"runner.output_dir={tmp_path}", "runner.limit=4",
                      "runner.warmup=0", "runner.progress=false", "task.max_new_tokens=16", "experiment_name=ppd")
    run(cfg, PairCache())
    df = ppd.pd.read_csv(tmp_path / "ppd.csv")
    t1 = ppd.table1(df)
    assert "| 1 | N |" in t1 and "| 5 | N |" in t1 and "layer 1" in t1
    assert "1–2 | 3–4 |" in ppd.position_tables(df)  # eight buckets of 16 / 8 tokens
    names = sorted(p.name for p in plots.make_all(tmp_path / "ppd.csv", tmp_path / "fig"))
    assert names == ["ppd_ppd_positions.md", "ppd_ppd_table1.md", "ppd_ppd_tradeoff.pdf", "ppd_ppd_tradeoff.png"]


# ------------------------------------------------------------------------------ per-layer heads (train.exit_heads)
def test_exit_heads_start_as_the_shared_head(tiny_pair):
    import torch

    from bildexp.layerwise import ExitHeads, exit_head

    heads = ExitHeads(tiny_pair.large, [1])
    h = torch.randn(3, tiny_pair.large.get_input_embeddings().embedding_dim)
    with torch.no_grad():
        torch.testing.assert_close(heads["1"](h), exit_head(tiny_pair.large, h))


def test_head_training_freezes_the_model_and_the_heads_change_match_rates(tmp_path, toy_examples):
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    import bildexp.train as train_mod
    from bildexp.config import PolicyConfig
    from bildexp.models import load_pair, resolve_path
    from bildexp.policies import make_policy

    from conftest import make_config
    from test_exactness import MAX_NEW, hf_greedy, prompts
    from test_train import FAST, train_config

    final = train_mod.train(train_config("train=tiny_t5_toy", "train.init=builtin:tiny_t5/large", "train.exit_heads=[1]",
                                         "train.lr=1e-2", f"train.output_dir={tmp_path}", *FAST))
    before = load_file(str(Path(resolve_path("builtin:tiny_t5/large")) / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself did not move
    assert (final / "exit_heads.safetensors").is_file()

    pair = load_pair(make_config("pair=tiny_t5").pair)
    ps = prompts(pair, toy_examples, make_config().task)
    plain = [make_policy(PolicyConfig(name="ppd_match", match_layers=[1])).decode(pair, p, MAX_NEW) for p in ps]
    tuned = [make_policy(PolicyConfig(name="ppd_match", match_layers=[1], match_heads=str(final))).decode(pair, p, MAX_NEW) for p in ps]
    assert [g.tokens for g in tuned] == [g.tokens for g in plain] == [hf_greedy(pair.large, pair, p) for p in ps]
    hits = lambda gens: sum(g.counters.get("match_l1_k1", 0) for g in gens)  # noqa: E731
    assert hits(tuned) > hits(plain)  # 20 steps of head training already raise layer 1's top-1 match rate


# ------------------------------------------------------------------------------ policy=ppd: real and exact
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("parallel", [False, True])
def test_ppd_equals_greedy_token_for_token(tiny_pair, toy_examples, k, parallel):
    from bildexp.config import PolicyConfig
    from bildexp.layerwise import decoder_layers
    from bildexp.policies import make_policy

    from conftest import make_config
    from test_exactness import MAX_NEW, hf_greedy, prompts

    ps = prompts(tiny_pair, toy_examples, make_config().task)
    ref = [hf_greedy(tiny_pair.large, tiny_pair, p) for p in ps]
    d = len(decoder_layers(tiny_pair.large))
    for dbar in sorted({-(-d // 2), d - 1}):
        policy = make_policy(PolicyConfig(name="ppd", ppd_layer=dbar, ppd_top_k=k, ppd_parallel=parallel))
        gens = [policy.decode(tiny_pair, p, MAX_NEW) for p in ps]
        assert [g.tokens for g in gens] == ref, (dbar, k)
        c = {key: sum(g.counters.get(key, 0) for g in gens) for key in gens[0].counters}
        # Not vacuous: candidates were adopted (and with k = 1 some were dropped); the counters follow
        # Theorem 4.1's accounting.
        assert 0 < c["ppd_adopted"] <= c["ppd_chances"]
        if k == 1:
            assert c["ppd_adopted"] < c["ppd_chances"]
        assert c["critical_layers"] == c["vanilla_layers"] - (d - dbar) * c["ppd_adopted"]
        assert c["vanilla_layers"] == d * c["ppd_steps"] == d * sum(len(g.tokens) for g in gens)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device: the branch stream runs on GPUs only")
def test_ppd_branch_on_its_own_cuda_stream_equals_greedy(toy_examples, pair_name):
    """On a GPU the branch runs on a second CUDA stream, ordered by stream waits: still greedy, token for token."""
    from bildexp.config import PolicyConfig
    from bildexp.models import load_pair
    from bildexp.policies import make_policy

    from conftest import make_config
    from test_exactness import MAX_NEW, prompts

    pair = load_pair(make_config(f"pair={pair_name}", "pair.device=cuda").pair)
    ps = prompts(pair, toy_examples, make_config().task)
    policy = make_policy(PolicyConfig(name="ppd", ppd_top_k=3, ppd_parallel=True))
    gens = [policy.decode(pair, p, MAX_NEW) for p in ps]
    assert policy.stream is not None and sum(g.counters.get("ppd_adopted", 0) for g in gens) > 0
    vanilla = make_policy(PolicyConfig(name="vanilla", which="large"))
    assert [g.tokens for g in gens] == [vanilla.decode(pair, p, MAX_NEW).tokens for p in ps]


def test_ppd_adopts_the_candidates_exact_state(tiny_pair, toy_examples):
    """A candidate's K/V and hidden state from the batched branch equal running that token alone."""
    import torch

    from bildexp.layerwise import LayerwiseDecoder

    from conftest import make_config
    from test_exactness import prompts

    prompt = prompts(tiny_pair, toy_examples, make_config().task)[0]
    enc = prompt.encoder_input_ids if tiny_pair.is_encoder_decoder else None
    a, b = LayerwiseDecoder(tiny_pair.large, enc), LayerwiseDecoder(tiny_pair.large, enc)
    past = torch.tensor([prompt.decoder_prefix + [7, 8]])
    a.logits(past)
    b.logits(past)
    h, kv = a.branch(torch.tensor([9, 4, 11]), 1)
    a.adopt(kv, 2)
    alone = b.run(b.embed(torch.tensor([[11]])), 0, 1)
    torch.testing.assert_close(h[2:3], alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.self_cache.layers[0].keys, b.self_cache.layers[0].keys, atol=1e-6, rtol=1e-6)
    assert a.lengths[0] == b.lengths[0] == past.shape[1] + 1


def test_ppd_layer_below_half_depth_is_one_line(tiny_pair, toy_examples):
    from bildexp import BildexpError
    from bildexp.config import PolicyConfig
    from bildexp.policies import make_policy

    from conftest import make_config
    from test_exactness import prompts

    p = prompts(tiny_pair, toy_examples, make_config().task)[0]
    with pytest.raises(BildexpError, match="PPD needs d̄ >= d/2"):
        make_policy(PolicyConfig(name="ppd", ppd_layer=99)).decode(tiny_pair, p, 4)


class _ClearedByTheOtherThread(dict):
    """A position memo that PPD's other thread empties right after every lookup: the worst interleaving."""

    def __contains__(self, key):
        found = super().__contains__(key)
        self.clear()
        return found

    def get(self, key, default=None):
        value = super().get(key, default)
        self.clear()
        return value


def test_position_encodings_survive_the_branch_thread_clearing_the_memo(tiny_pair, toy_examples):
    """layerwise._positions is shared by PPD's two threads: a clear between a lookup and its use must not fail
    (it raised KeyError when it checked membership, then read), and the logits stay those of a private memo."""
    import torch

    from bildexp.layerwise import LayerwiseDecoder

    from conftest import make_config
    from test_exactness import prompts

    prompt = prompts(tiny_pair, toy_examples, make_config().task)[0]
    enc = prompt.encoder_input_ids if tiny_pair.is_encoder_decoder else None
    shared, private = LayerwiseDecoder(tiny_pair.large, enc), LayerwiseDecoder(tiny_pair.large, enc)
    shared._position_memo = _ClearedByTheOtherThread()
    tokens = torch.tensor([prompt.decoder_prefix + [7, 8]])
    for step in (tokens, torch.tensor([[9]]), torch.tensor([[4]])):
        # One token's layers in two slices, as PPD's main thread and CALM run them: the second slice finds its
        # positions memoised by the first.
        h = shared.run(shared.run(shared.embed(step), 0, 1), 1, shared.n_layers)
        torch.testing.assert_close(shared.head(h)[0], private.logits(step), atol=0, rtol=0)
