"""The static-cache path (pair.cache=static) and compiled decoding (pair.compile), in fp32.

Cache mechanics are checked uncompiled (fast) against the dynamic path on every supported family; exactness is
checked compiled, token for token, on both tiny pairs (the trained t5_multi30k_aligned pair by scripts/bench_compiled.py): vanilla against
eager greedy, and BiLD at its lossless corners and speculative greedy against vanilla large on the same backend.
Compiled tests keep BiLD's and speculative's windows at <= 4 tokens, so each model compiles few graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bildexp import BildexpError
from bildexp.cache import MAX_BUCKET, ModelState, StaticDecoder, bucket
from bildexp.config import PolicyConfig
from bildexp.models import load_pair
from bildexp.policies import make_policy
from bildexp.tasks import load_task

from conftest import make_config
from test_cache import _random_model
from test_exactness import hf_greedy, prompts

MAX_NEW = 40


def test_buckets_are_powers_of_two_up_to_the_largest():
    assert [bucket(k) for k in (1, 2, 3, 4, 5, 8, 9, 11, 16)] == [1, 2, 4, 4, 8, 8, 16, 16, 16]
    assert bucket(MAX_BUCKET + 1) == MAX_BUCKET + 1  # longer passes (a decoder-only prompt) run at their own length


# ------------------------------------------------------------------ cache mechanics, uncompiled
def _models():
    return {"qwen2": _random_model("qwen2").eval(), "mt5": _random_model("mt5").eval()}


@pytest.mark.parametrize("arch", ["qwen2", "mt5"])
def test_static_state_equals_the_dynamic_one(arch):
    model = _models()[arch]
    enc = torch.tensor([[5, 6, 7, 8, 9, 10]]) if model.config.is_encoder_decoder else None
    seq = torch.tensor([[2, 11, 12, 13, 14, 15, 16]])
    static = StaticDecoder(model)
    # A 3-token pass is padded to 4: the kept logits are those of the unpadded dynamic pass.
    dyn, st = ModelState(model, enc), ModelState(model, enc, static=static)
    torch.testing.assert_close(st.advance(seq[:, :3], keep=3), dyn.advance(seq[:, :3], keep=3), atol=1e-5, rtol=1e-5)
    # The padding's K/V sit past the position and are masked, then overwritten: later steps are unaffected.
    for i in range(3, 7):
        torch.testing.assert_close(st.advance(seq[:, i : i + 1]), dyn.advance(seq[:, i : i + 1]), atol=1e-5, rtol=1e-5)
    # Rollback moves the write position only; what follows equals a fresh pass over the new sequence.
    st.rollback(4)
    assert st.length == 4 and int(static.position) == 6  # the position is set by the next pass, not by rollback
    new = torch.tensor([[20, 21, 22]])
    fresh = ModelState(model, enc).advance(torch.cat([seq[:, :4], new], 1), keep=3)
    torch.testing.assert_close(st.advance(new, keep=3), fresh, atol=1e-5, rtol=1e-5)
    # One state at a time per model: starting another example invalidates the old state.
    ModelState(model, enc, static=static)
    with pytest.raises(RuntimeError, match="started another example"):
        st.advance(new[:, :1])


def test_eager_static_passes_compute_the_lm_head_on_kept_positions_only():
    """A long prompt pass (eager, unpadded) and a padded short one compute the LM head on the kept positions (and the
    padding after them) only, as transformers' logits_to_keep does on the dynamic path: the same logits."""
    model = _models()["qwen2"]
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        prompt = torch.arange(2, MAX_BUCKET + 7).unsqueeze(0)  # k = MAX_BUCKET + 5: one eager pass of its own length
        dyn, st = ModelState(model), ModelState(model, static=StaticDecoder(model))
        torch.testing.assert_close(st.advance(prompt, keep=2), dyn.advance(prompt, keep=2), atol=1e-5, rtol=1e-5)
        three = torch.tensor([[40, 41, 42]])  # padded to 4: the head on the 2 kept rows and the 1 padding row
        torch.testing.assert_close(st.advance(three, keep=2), dyn.advance(three, keep=2), atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
    assert rows == [2, 2, 3, 2]  # static, dynamic (prompt); static (kept + padding), dynamic


def test_padded_sources_give_the_unpadded_cross_attention():
    """The CUDA-graph route's encoder buckets, checked uncompiled on a CPU: a source padded to its bucket (masked)
    gives the decoder the logits of the unpadded source, and warmup runs every bucket up to the capacity."""
    model = _models()["mt5"]
    static = StaticDecoder(model)
    static.bucket_sources = True
    static.reserve(64, 40)
    assert [static.source_bucket(s) for s in (1, 6, 16, 17, 33, 40)] == [16, 16, 16, 32, 48, 48]
    seq = torch.tensor([[2, 11, 12, 13, 14]])
    for enc in (torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.arange(3, 40).unsqueeze(0), torch.tensor([[4, 5]])):
        dyn, st = ModelState(model, enc), ModelState(model, enc, static=static)
        torch.testing.assert_close(st.advance(seq[:, :2], keep=2), dyn.advance(seq[:, :2], keep=2), atol=1e-5, rtol=1e-5)
        for i in range(2, 5):
            torch.testing.assert_close(st.advance(seq[:, i : i + 1]), dyn.advance(seq[:, i : i + 1]), atol=1e-5, rtol=1e-5)
    assert sorted(static._sources) == [16, 48]
    static.warmup(1)
    assert sorted(static._sources) == [16, 32, 48]


def test_static_capacity_grows_mid_example_keeping_the_cache():
    model = _models()["qwen2"]
    static = StaticDecoder(model)
    cap = static.decoder_capacity
    seq = torch.randint(3, 120, (1, cap + 10))
    st, dyn = ModelState(model, static=static), ModelState(model)
    st.advance(seq[:, : cap - 2]), dyn.advance(seq[:, : cap - 2])
    for i in range(cap - 2, cap + 10):  # crosses the capacity: buffers reallocated, cached K/V copied over
        torch.testing.assert_close(st.advance(seq[:, i : i + 1]), dyn.advance(seq[:, i : i + 1]), atol=1e-5, rtol=1e-5)
    assert static.decoder_capacity > cap


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_unsupported_model_types_are_refused_in_one_line(arch):
    with pytest.raises(ValueError, match=r"pair.cache=static supports t5, mt5, llama, qwen2 models, not .*use pair.cache=dynamic"):
        StaticDecoder(_random_model(arch).eval())


@pytest.mark.parametrize("overrides, message", [
    (["pair.compile=default"], "pair.compile=default compiles the static-cache path: add pair.cache=static"),
    (["pair.cache=static", "pair.freeze=true"], "pair.freeze=true freezes compiled graphs: add pair.compile=default"),
    (["pair.cache=static", "policy=calm"], "policy=calm runs eager on dynamic caches only"),
    (["pair.cache=static", "policy=hf_assisted"], "policy=hf_assisted runs eager on dynamic caches only"),
    (["pair.cache=static", "policy=ppd"], "policy=ppd runs eager on dynamic caches only"),
    (["pair.cache=static", "pair=t5_multi30k_early_exit", "task=multi30k"], "is an early-exit pair"),
    (["pair.compile=fastest"], "pair.compile='fastest' is not one of none, default, reduce-overhead"),
    (["pair.cache=paged"], "pair.cache='paged' is not one of dynamic, static"),
])
def test_unsupported_combinations_are_one_line(overrides, message):
    with pytest.raises(BildexpError, match=message):
        make_config(*overrides)


def test_static_policies_equal_dynamic_on_the_tiny_pairs(tiny_pair, toy_examples):
    """Uncompiled static path: every ModelState policy gives the dynamic path's tokens and counters."""
    ps = prompts(tiny_pair, toy_examples, make_config().task)
    static = dataclasses.replace(tiny_pair, static={r: StaticDecoder(m) for r, m in (("large", tiny_pair.large), ("small", tiny_pair.small))})
    for kw in (dict(name="vanilla", which="large"), dict(name="vanilla", which="small"), dict(name="oracle", replace_threshold=0.3),
               dict(name="bild", fallback_threshold=0.5, rollback_threshold=1.0), dict(name="speculative", num_draft_tokens=5),
               dict(name="bild", fallback_threshold=0.4, rollback_threshold=2.0, sampling=True, temperature=2.0)):
        policy = make_policy(PolicyConfig(**kw))
        a = [policy.decode(tiny_pair, p, MAX_NEW, seed=i) for i, p in enumerate(ps)]
        b = [policy.decode(static, p, MAX_NEW, seed=i) for i, p in enumerate(ps)]
        assert [g.tokens for g in a] == [g.tokens for g in b], kw
        assert [g.counters for g in a] == [g.counters for g in b], kw


# ------------------------------------------------------------------ compiled exactness
_COMPILED: dict = {}


def compiled_setup(pair_name: str, task: str, freeze: bool = False):
    """(eager dynamic pair, compiled static pair, prompts, eager greedy of large): built once per session."""
    if (pair_name, freeze) not in _COMPILED:
        cfg = make_config(f"pair={pair_name}", f"task={task}")
        eager = load_pair(cfg.pair)
        compiled = load_pair(make_config(f"pair={pair_name}", f"task={task}", "pair.cache=static", "pair.compile=default",
                                         f"pair.freeze={str(freeze).lower()}").pair)
        ps = prompts(eager, load_task(cfg.task, limit=12).examples, cfg.task)
        _COMPILED[pair_name, freeze] = (eager, compiled, ps, [hf_greedy(eager.large, eager, p) for p in ps])
    return _COMPILED[pair_name, freeze]


def first_divergence(eager, compiled, prompt, got: list[int], ref: list[int]) -> str:
    """Where a compiled output leaves the eager one: the eager model's top-2 logit gap at that step."""
    j = next(i for i, (a, b) in enumerate(zip(got + [-1], ref + [-1])) if a != b)
    state = ModelState(eager.large, prompt.encoder_input_ids)
    logits = state.advance(torch.tensor([prompt.decoder_prefix + ref[:j]]))[-1]
    top = torch.topk(logits, 2).values
    return f"diverges at token {j}: eager top-2 logit gap {float(top[0] - top[1]):.3g}"


def run_all(pair, ps, **kw):
    policy = make_policy(PolicyConfig(**kw))
    return [policy.decode(pair, p, MAX_NEW) for p in ps]


# CI time (each case costs 15-35 s): tiny_llama unfrozen, tiny_t5 frozen. The real t5_multi30k pair compiled is
# checked against eager greedy by scripts/bench_compiled.py (150/150 identical, docs/testbeds.md).
@pytest.mark.parametrize("pair_name, task, freeze", [("tiny_llama", "toy", False), ("tiny_t5", "toy", True)])
def test_compiled_decoding_is_exact(pair_name, task, freeze):
    """freeze: inductor freezing (weights as constants, prepacked linears): other kernels, the same tokens."""
    eager, compiled, ps, large_ref = compiled_setup(pair_name, task, freeze)
    assert compiled.static["large"].compile_mode == "default" and compiled.static["large"].freeze == freeze
    # Vanilla, compiled, against transformers' eager greedy generate(): any difference is shown with its logit gap.
    vanilla = [g.tokens for g in run_all(compiled, ps, name="vanilla", which="large")]
    diffs = [first_divergence(eager, compiled, p, g, r) for p, g, r in zip(ps, vanilla, large_ref) if g != r]
    assert not diffs, f"{len(diffs)} of {len(ps)} compiled outputs differ from eager greedy: {diffs}"
    small_ref = [hf_greedy(eager.small, eager, p) for p in ps]
    assert [g.tokens for g in run_all(compiled, ps, name="vanilla", which="small")] == small_ref
    assert sum(a != b for a, b in zip(small_ref, large_ref)) >= 2, "the pair should really disagree"
    # The lossless corners of BiLD and speculative greedy equal vanilla large on the same (compiled) backend.
    bild0 = run_all(compiled, ps, name="bild", fallback_threshold=0.3, rollback_threshold=0.0, max_small_steps=3)
    assert [g.tokens for g in bild0] == vanilla
    assert sum(g.counters.get("rollbacks", 0) for g in bild0) > 0 and sum(g.counters.get("small_tokens", 0) for g in bild0) > 0
    bild1 = run_all(compiled, ps, name="bild", fallback_threshold=1.0, rollback_threshold=2.0, max_small_steps=3)
    assert [g.tokens for g in bild1] == vanilla and sum(g.counters["fallbacks"] for g in bild1) > 0
    spec = run_all(compiled, ps, name="speculative", num_draft_tokens=3)
    assert [g.tokens for g in spec] == vanilla
    assert sum(g.counters["accepted_tokens"] for g in spec) > 0 and sum(g.counters["tokens_rolled_back"] for g in spec) > 0
    # Between the corners BiLD is lossy; compiled and eager take the same decisions on these inputs.
    mid = dict(name="bild", fallback_threshold=0.5, rollback_threshold=1.0, max_small_steps=3)
    assert [g.tokens for g in run_all(compiled, ps, **mid)] == [g.tokens for g in run_all(eager, ps, **mid)]
    for decoder in compiled.static.values():
        assert decoder.stats.graphs <= 2 * len({bucket(k) for k in range(1, 5)}) + 1  # first + later pass per bucket, encoder


def test_compiled_run_reports_compilation_apart(tmp_path):
    """A run on the compiled path compiles every graph before timing: the row says how long, and that
    no timed example compiled; the run id and columns name the backend."""
    from bildexp.models import PairCache
    from bildexp.results import run_id
    from bildexp.runner import run

    cfg = make_config("pair=tiny_t5", "pair.cache=static", "pair.compile=default", "policy=bild", "policy.max_small_steps=3",
                      "runner.limit=4", f"runner.output_dir={tmp_path}")
    eager_cfg = make_config("pair=tiny_t5", "policy=bild", "policy.max_small_steps=3")
    assert ".float32.static-default." in run_id(cfg) and ".float32." in run_id(eager_cfg) and "static" not in run_id(eager_cfg)
    frozen = make_config("pair=tiny_t5", "pair.cache=static", "pair.compile=default", "pair.freeze=true", "policy=bild")
    assert ".float32.static-default-frozen." in run_id(frozen)
    row = run(cfg, PairCache())
    assert row["cache"] == "static" and row["compile"] == "default"
    assert row["compiled_graphs"] > 0 and row["compile_s"] > 0 and row["late_compiles"] == 0


def test_decoding_raises_no_library_deprecation_warning(tiny_pair, toy_examples):
    """Caches are passed as `cache=` (transformers 5.x deprecates `past_key_values`, removed in 5.40), so a run's
    terminal shows bildexp's progress bar and summary, not a FutureWarning per forward pass."""
    import warnings

    ps = prompts(tiny_pair, toy_examples, make_config().task)[:2]
    static = dataclasses.replace(tiny_pair, static={r: StaticDecoder(m) for r, m in (("large", tiny_pair.large), ("small", tiny_pair.small))})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for pair in (tiny_pair, static):
            for kw in (dict(name="vanilla"), dict(name="bild", fallback_threshold=0.5, rollback_threshold=1.0)):
                run_all(pair, ps, **kw)
