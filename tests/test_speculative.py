"""Speculative decoding is lossless, and transformers' assisted generation agrees with it (fp32, CPU).

Greedy: token for token equal to the large model's greedy output on both tiny pairs. Sampling: on a
pair of tiny random models with an 8-token vocabulary, the sampled continuations follow the large
model's exact distribution (chi-square goodness of fit) and not the small model's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bildexp import BildexpError
from bildexp.config import PolicyConfig
from bildexp.models import PairCache, assemble_pair
from bildexp.policies import make_policy
from bildexp.policies.base import Policy, Prompt, sample_token
from bildexp.runner import run

from conftest import make_config
from test_exactness import MAX_NEW, hf_greedy, prompts, run_policy


@pytest.fixture(scope="module")
def setup(tiny_pair, toy_examples):
    ps = prompts(tiny_pair, toy_examples, make_config().task)
    return tiny_pair, ps, [hf_greedy(tiny_pair.large, tiny_pair, p) for p in ps]


def total(gens) -> Counter:
    return sum((Counter(g.counters) for g in gens), Counter())


# --- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_speculative_greedy_equals_large(setup, k):
    pair, ps, large_ref = setup
    got = run_policy(pair, ps, name="speculative", num_draft_tokens=k)
    assert [g.tokens for g in got] == large_ref
    c = total(got)
    # Not vacuous: drafts were both accepted and rejected.
    assert 0 < c["accepted_tokens"] < c["drafted_tokens"] and c["rollbacks"] > 0
    assert max(c[f"drafted_at_{i}"] for i in range(1, k + 1)) > 0 and c[f"drafted_at_{k + 1}"] == 0


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_speculative_stops_where_greedy_stops(setup, max_new):
    """max_new_tokens cuts mid-window exactly where greedy decoding would (greedy is prefix-consistent)."""
    pair, ps, large_ref = setup
    policy = make_policy(PolicyConfig(name="speculative", num_draft_tokens=5))
    assert [policy.decode(pair, p, max_new).tokens for p in ps] == [ref[:max_new] for ref in large_ref]


def test_speculative_any_declared_eos_ends_generation(setup):
    pair, ps, large_ref = setup
    ref = large_ref[0]
    stop = ref[2]
    two_eos = dataclasses.replace(pair, eos_token_ids=(*pair.eos_token_ids, stop))
    got = run_policy(two_eos, ps[:1], name="speculative", num_draft_tokens=4)[0]
    assert got.tokens == ref[: ref.index(stop) + 1]


def test_speculative_counters_are_consistent(setup):
    pair, ps, _ = setup
    k = 4
    for g in run_policy(pair, ps, name="speculative", num_draft_tokens=k):
        c = Counter(g.counters)
        assert c["output_tokens"] == len(g.tokens) == len(g.provenance)
        assert c["drafts"] == c["large_calls"] == c["fallbacks"]
        assert c["drafted_tokens"] == c["small_tokens"] == c["small_steps"] == c["accepted_tokens"] + c["tokens_rolled_back"]
        assert c["accepted_tokens"] == g.provenance.count("S")
        # One large token per window, except a window whose accepted draft ended the sequence.
        assert c["drafts"] - 1 <= g.provenance.count("L") <= c["drafts"]
        assert sum(c[f"drafted_at_{i}"] for i in range(1, k + 1)) == c["drafted_tokens"]
        assert sum(c[f"accepted_at_{i}"] for i in range(1, k + 1)) == c["accepted_tokens"]
        assert all(c[f"accepted_at_{i}"] <= c[f"drafted_at_{i}"] for i in range(1, k + 1))
        assert all(c[f"drafted_at_{i + 1}"] <= c[f"drafted_at_{i}"] for i in range(1, k))


def test_bad_num_draft_tokens_is_one_line_error():
    # Checked once, where every config is validated (config.validate), before any model is loaded.
    with pytest.raises(BildexpError, match="num_draft_tokens"):
        make_config("policy=speculative", "policy.num_draft_tokens=0")


# --- transformers' assisted generation ---------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_hf_assisted_equals_vanilla_and_speculative(setup, k):
    pair, ps, _ = setup
    vanilla = [g.tokens for g in run_policy(pair, ps, name="vanilla")]
    a = run_policy(pair, ps, name="hf_assisted", num_draft_tokens=k)
    b = run_policy(pair, ps, name="hf_assisted", num_draft_tokens=k)
    assert [g.tokens for g in a] == [g.tokens for g in b] == vanilla
    assert all(g.provenance == "L" * len(g.tokens) == "L" * g.counters["output_tokens"] for g in a)
    # Same windows as our implementation: one large pass per draft window, example by example.
    ours = run_policy(pair, ps, name="speculative", num_draft_tokens=k)
    assert [g.counters["large_calls"] for g in a] == [g.counters["large_calls"] for g in ours]


def test_hf_assisted_pins_the_assistant_knobs(setup):
    """A mutated assistant config (heuristic schedule, other window, early stop) changes nothing, and is left as found."""
    pair, ps, _ = setup
    clean = run_policy(pair, ps[:4], name="hf_assisted", num_draft_tokens=3)
    own = pair.small.generation_config
    mutated = copy.deepcopy(own)
    mutated.num_assistant_tokens, mutated.num_assistant_tokens_schedule, mutated.assistant_confidence_threshold = 17, "heuristic", 0.9
    pair.small.generation_config = mutated
    try:
        got = run_policy(pair, ps[:4], name="hf_assisted", num_draft_tokens=3)
        assert pair.small.generation_config is mutated and mutated.num_assistant_tokens == 17
    finally:
        pair.small.generation_config = own
    assert [(g.tokens, g.counters) for g in got] == [(g.tokens, g.counters) for g in clean]


def test_sampling_is_reproducible(setup):
    pair, ps, large_ref = setup
    for name in ("speculative", "hf_assisted"):
        policy = make_policy(PolicyConfig(name=name, num_draft_tokens=3, sampling=True, top_p=0.95, temperature=2.0))
        a = [policy.decode(pair, p, MAX_NEW, seed=i).tokens for i, p in enumerate(ps[:4])]
        b = [policy.decode(pair, p, MAX_NEW, seed=i).tokens for i, p in enumerate(ps[:4])]
        assert a == b and a != large_ref[:4], name


@pytest.mark.parametrize("policy", ["speculative", "hf_assisted"])
def test_runner_reports_acceptance(tmp_path, pair_name, policy):
    cfg = make_config(
        f"pair={pair_name}", f"policy={policy}", "policy.num_draft_tokens=3", f"runner.output_dir={tmp_path}",
        "runner.limit=3", "runner.warmup=0", "runner.progress=false", "task.max_new_tokens=24",
    )
    row = run(cfg, PairCache())
    assert row["num_draft_tokens"] == 3 and row["output_tokens"] > 0
    if policy == "hf_assisted":
        assert row["large_token_share"] == 1.0 and row["large_calls"] < row["output_tokens"]
    else:
        assert 0 < row["acceptance_rate"] < 1 and len(row["acceptance_by_position"].split()) == 3
        assert row["rollback_rate"] == pytest.approx(1 - row["acceptance_rate"])
        assert row["fallback_rate"] == pytest.approx(row["drafts"] / row["drafted_tokens"])


# --- sampling reproduces the large model's distribution ----------------------------------------

V, EOS, PREFIX = 8, 4, [1, 2, 3]


def tiny_llama(seed: int, layers: int) -> LlamaForCausalLM:
    # initializer_range 0.5 (not 0.02) makes the next-token distributions peaked and seed-dependent.
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, initializer_range=0.5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=EOS, pad_token_id=EOS,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = EOS  # what assemble_pair reads
    return model


@pytest.fixture(scope="module")
def stat_pair():
    return assemble_pair("stat", tiny_llama(1, 1), tiny_llama(2, 1), None, torch.device("cpu"), torch.float32)


def exact_two_tokens(model, policy: Policy) -> dict[tuple[int, ...], float]:
    """Probability of each 2-token continuation of PREFIX (eos ends it after one): p(t1) * p(t2 | t1)."""
    with torch.inference_mode():
        ids = torch.tensor([PREFIX + [t] for t in range(V)])  # [V, P + 1]
        logits = model(input_ids=ids).logits  # [V, P + 1, V]
    p1 = policy.dist(logits[0, -2])  # [V] after PREFIX
    p2 = policy.dist(logits[:, -1])  # [V, V] after PREFIX + t1
    probs = {(t1,): float(p1[t1]) for t1 in range(V) if t1 == EOS}
    probs.update({(t1, t2): float(p1[t1] * p2[t1, t2]) for t1 in range(V) if t1 != EOS for t2 in range(V)})
    return probs


def first_token(probs: dict[tuple[int, ...], float]) -> dict[tuple[int], float]:
    marginal: Counter = Counter()
    for cell, p in probs.items():
        marginal[cell[:1]] += p
    return dict(marginal)


def chi_square_pvalue(observed: Counter, probs: dict, n: int) -> float:
    """Goodness of fit of observed counts to probs; cells expected < 5 are pooled. 0.0 if a sample is impossible."""
    if any(probs.get(cell, 0.0) == 0.0 for cell in observed):
        return 0.0
    cells = sorted(probs, key=probs.get)
    pooled_o = pooled_e = 0.0
    stat, bins = 0.0, 0
    for cell in cells:
        o, e = observed.get(cell, 0), n * probs[cell]
        if e < 5 or pooled_e and pooled_e < 5:  # the smallest cells go into one bin until it reaches 5
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat, bins = stat + (o - e) ** 2 / e, bins + 1
    if pooled_e > 0:
        stat, bins = stat + (pooled_o - pooled_e) ** 2 / pooled_e, bins + 1
    df = bins - 1
    # Upper tail of chi-square(df) = regularised upper incomplete gamma Q(df / 2, stat / 2); no scipy needed.
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


# k=1: each window is one draft + the bonus token, so both the residual and the bonus sample are
# checked; k=2 fills the 2-token continuation with a draft window, under temperature and nucleus
# (only ~10 continuations survive, so fewer draws suffice). A draw costs ~4 ms.
@pytest.mark.parametrize("k, temperature, top_p, n", [(1, 1.0, 1.0, 2000), (2, 0.8, 0.9, 1000)])
def test_speculative_sampling_follows_large_distribution(stat_pair, k, temperature, top_p, n):
    policy = make_policy(PolicyConfig(name="speculative", num_draft_tokens=k, sampling=True, temperature=temperature, top_p=top_p))
    large, small = exact_two_tokens(stat_pair.large, policy), exact_two_tokens(stat_pair.small, policy)
    assert sum(abs(large[c] - small[c]) for c in large) / 2 > 0.3, "the two models must clearly disagree"
    draws = [tuple(policy.decode(stat_pair, Prompt(PREFIX), 2, seed=i).tokens) for i in range(n)]
    pairs, firsts = Counter(draws), Counter(d[:1] for d in draws)
    assert chi_square_pvalue(pairs, large, n) > 1e-3
    assert chi_square_pvalue(firsts, first_token(large), n) > 1e-3
    # Power: the same test rejects the small model's distribution, so it can fail.
    assert chi_square_pvalue(pairs, small, n) < 1e-3
    assert chi_square_pvalue(firsts, first_token(small), n) < 1e-3
    c = Counter(policy.counters)  # the last draw: drafts really happened
    assert c["drafts"] >= 1 and c["drafted_tokens"] >= 1


def test_choose_samples_like_sample_token():
    """`Policy.choose` draws from `Policy.dist`, with the same draws per seed as the nucleus sampler."""
    policy = Policy(PolicyConfig(sampling=True, top_p=0.7, temperature=1.5))
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    dist = policy.dist(logits)
    assert math.isclose(float(dist.sum()), 1.0, rel_tol=1e-6)
    kept = torch.sort(policy.probs(logits), descending=True).values
    n_kept = int((dist > 0).sum())
    assert float(kept[: n_kept - 1].sum()) < 0.7 <= float(kept[:n_kept].sum()) + 1e-6
    g = torch.Generator()
    for seed in range(20):
        policy.generator.manual_seed(seed)
        g.manual_seed(seed)
        assert policy.choose(logits) == sample_token(policy.probs(logits), 0.7, g)


@pytest.mark.parametrize("vocab", [50, 5000])
def test_top_nucleus_equals_the_full_sort_definition(vocab):
    """The partial-sort nucleus (topk, widened as needed) keeps exactly the tokens a full sort keeps, peaked or flat."""
    from bildexp.policies.base import nucleus

    g = torch.Generator().manual_seed(vocab)
    for scale in (0.3, 3.0, 10.0):
        probs = torch.softmax(torch.randn(vocab, generator=g) * scale, -1)
        for top_p in (0.3, 0.8, 0.95, 1.0):
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p if top_p < 1 else torch.ones(vocab, dtype=torch.bool)
            expected = torch.zeros_like(probs).scatter(-1, order, torch.where(keep, sorted_p, 0.0))
            torch.testing.assert_close(nucleus(probs, top_p), expected / expected.sum())
