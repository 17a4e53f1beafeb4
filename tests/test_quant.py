"""Weight-only quantized drafts (bildexp/quant.py): codes that dequantize within their rounding error, lossless
policies still exact against the large model in fp32, the static compiled path, and one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bildexp import PROJECT_ROOT, BildexpError
from bildexp.config import PolicyConfig
from bildexp.cost import ModelCost
from bildexp.models import load_pair
from bildexp.policies import make_policy
from bildexp.quant import WeightOnlyLinear, quantize
from bildexp.results import run_id
from bildexp.tasks import encode

from conftest import make_config

GROUP = 32  # the tiny pairs' layers have 64 or 128 inputs
N_INPUTS = 10
MAX_NEW = 32


def test_codes_dequantize_within_their_rounding_error():
    """Each weight is within half a quantization step of its original: int4 s = (max - min) / 15 of its group of
    GROUP inputs, int8 s = max |w| / 127 of its row; and the codes are not a copy (they do round)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    w = linear.weight.detach().float()  # [48, 128]
    for mode in ("int4", "int8"):
        q = WeightOnlyLinear(linear, mode, GROUP)
        deq = q.dequantize()
        if mode == "int4":
            groups = w.reshape(48, 128 // GROUP, GROUP)
            step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(GROUP, dim=1)  # [48, 128]
        else:
            step = (w.abs().amax(1, keepdim=True) / 127).expand_as(w)
        err = (deq - w).abs()
        assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all(), f"{mode}: max error {err.max():.3g} over half a step"
        assert err.max() > step.max() / 100  # really rounded
        x = torch.randn(3, 5, 128)
        torch.testing.assert_close(q(x), x @ deq.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_long_passes_run_dense_on_the_same_weights():
    """With dense_rows, a pass of that many rows or more runs F.linear on the dequantized weights: the same outputs as
    the weight-only kernel within rounding, and shorter passes still take the kernel (they never read the copy)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    for mode in ("int4", "int8"):
        kernel, dense = WeightOnlyLinear(linear, mode, GROUP), WeightOnlyLinear(linear, mode, GROUP, dense_rows=4)
        torch.testing.assert_close(dense.dense, kernel.dequantize())
        long, short = torch.randn(6, 128), torch.randn(3, 128)
        torch.testing.assert_close(dense(long), kernel(long), rtol=1e-5, atol=1e-5)
        dense.dense.zero_()  # a short pass must not read it; a long one now must
        assert torch.equal(dense(short), kernel(short))
        assert torch.equal(dense(long), dense.bias.expand(6, 48))
        assert dense.storage_bytes() == kernel.storage_bytes()  # a decode step reads the codes only


@pytest.fixture(scope="module", params=["int4", "int8", "int4-dense4", "int4-head64"])
def quant_pair(request):
    """tiny_llama with its small model quantized (int4-dense4: prompts of 4 tokens or more dense; int4-head64: the LM
    head in groups of 64, the other layers in GROUP), and the same pair unquantized (both fp32)."""
    plain = load_pair(make_config("pair=tiny_llama").pair)
    mode, _, extra = request.param.partition("-")
    setting = {"dense4": "pair.quant_dense_rows=4", "head64": "pair.quant_head_group_size=64", "": "pair.quant_dense_rows=0"}[extra]
    cfg = make_config("pair=tiny_llama", f"pair.small_quant={mode}", f"pair.quant_group_size={GROUP}", setting)
    return mode, load_pair(cfg.pair), plain, cfg


def _decode(pair, prompts, **kw):
    policy = make_policy(PolicyConfig(**kw))
    return [policy.decode(pair, p, MAX_NEW).tokens for p in prompts]


def test_lossless_policies_stay_exact_with_a_quantized_draft(quant_pair, toy_examples):
    """Quantization changes only what the draft proposes: BiLD at rollback 0 and greedy speculative equal vanilla
    large token for token (fp32), while the quantized draft's own greedy output differs from the plain one's."""
    mode, pair, plain, cfg = quant_pair
    prompts = [encode(ex, cfg.task, pair)[0] for ex in toy_examples[:N_INPUTS]]
    n = sum(isinstance(m, WeightOnlyLinear) for m in pair.small.modules())
    assert n == sum(isinstance(m, torch.nn.Linear) for m in plain.small.modules()) and n > 0
    assert not any(isinstance(m, WeightOnlyLinear) for m in pair.large.modules())
    if mode == "int4":
        assert pair.small.get_output_embeddings().group_size == (cfg.pair.quant_head_group_size or GROUP)
    large = _decode(pair, prompts, name="vanilla", which="large")
    assert large == _decode(plain, prompts, name="vanilla", which="large")
    small_q = _decode(pair, prompts, name="vanilla", which="small")
    assert any(a != b for a, b in zip(small_q, large)), "the draft must disagree with the large model somewhere"
    assert _decode(pair, prompts, name="bild", fallback_threshold=0.0, rollback_threshold=0.0, max_small_steps=1000) == large
    assert _decode(pair, prompts, name="bild", fallback_threshold=0.6, rollback_threshold=0.0) == large
    assert _decode(pair, prompts, name="speculative", num_draft_tokens=4) == large


def test_quantized_draft_on_the_compiled_static_path(toy_examples):
    """int4 draft, static caches and torch.compile: speculative equals vanilla large, every graph compiled before timing."""
    cfg = make_config("pair=tiny_llama", "pair.small_quant=int4", f"pair.quant_group_size={GROUP}",
                      "pair.cache=static", "pair.compile=default", "policy=speculative")
    pair = load_pair(cfg.pair)
    prompts = [encode(ex, cfg.task, pair)[0] for ex in toy_examples[:4]]
    pair.prepare_static(prompts, MAX_NEW, 16)  # 16: the toy prompts' own pass too (bucket 16)
    eager = load_pair(make_config("pair=tiny_llama").pair)
    assert _decode(pair, prompts, name="speculative", num_draft_tokens=4) == _decode(eager, prompts, name="vanilla")
    assert pair.late_compiles() == 0


def test_lm_head_takes_its_own_int4_group_size():
    """quantize(head_group_size=...): the LM head in groups of its own, every other layer in group_size; a head width
    the head's group size does not divide is refused in one line."""
    from bildexp.models import load_model

    model = load_model("builtin:tiny_llama/small", torch.float32, torch.device("cpu"))
    n = quantize(model, "int4", GROUP, head_group_size=2 * GROUP)
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert n + 1 == len(layers) and model.get_output_embeddings().group_size == 2 * GROUP
    assert {m.group_size for m in layers if m is not model.get_output_embeddings()} == {GROUP}
    fresh = load_model("builtin:tiny_llama/small", torch.float32, torch.device("cpu"))
    with pytest.raises(BildexpError, match="cannot be cut into groups of 4096"):
        quantize(fresh, "int4", GROUP, head_group_size=4096)


def test_t5_layers_quantize():
    """T5's Linear layers (encoder, decoder, cross-attention, LM head) take int4 too; the cost model counts their
    weights as before and reads them at about half a byte each."""
    cfg = make_config("pair=tiny_t5")
    pair = load_pair(cfg.pair)
    before = ModelCost.of(pair.small)
    quantize(pair.small, "int4", GROUP)
    after = ModelCost.of(pair.small)
    assert (after.decoder_weights, after.head_weights, after.cross_kv_weights, after.encoder_weights) == (
        before.decoder_weights, before.head_weights, before.cross_kv_weights, before.encoder_weights)
    assert before.bytes_per_weight == 4 and 0.5 < after.bytes_per_weight < 1.0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        out = pair.small(input_ids=ids, decoder_input_ids=ids[:, :1]).logits
    assert torch.isfinite(out).all()


def test_quant_settings_in_run_id_and_row():
    plain = make_config("pair=tiny_llama")
    q = make_config("pair=tiny_llama", "pair.small_quant=int4", f"pair.quant_group_size={GROUP}")
    assert ".small-int4-g32." in run_id(q) and "int" not in run_id(plain).split(".", 3)[3]
    from bildexp.results import config_columns

    cols = config_columns(q)
    assert (cols["small_quant"], cols["large_quant"], cols["quant_group_size"]) == ("int4", "none", GROUP)
    dense = make_config("pair=tiny_llama", "pair.small_quant=int4", f"pair.quant_group_size={GROUP}", "pair.quant_dense_rows=16")
    assert ".small-int4-g32-dense16." in run_id(dense) and config_columns(dense)["quant_dense_rows"] == 16
    head = make_config("pair=tiny_llama", "pair.small_quant=int4", f"pair.quant_group_size={GROUP}", "pair.quant_head_group_size=64")
    assert ".small-int4-g32-head64." in run_id(head) and config_columns(head)["quant_head_group_size"] == 64
    assert config_columns(q)["quant_head_group_size"] is None  # unset: out of the id's hash, earlier ids hold


@pytest.mark.parametrize("overrides, message", [
    (["pair.small_quant=int3"], "pair.small_quant='int3' is not one of none, int8, int4"),
    (["pair.small_quant=int4"], "groups of 128"),
    (["pair.small_quant=int4", "pair.quant_group_size=48"], "must be a power of two"),
    ([f"pair.small_quant=int4", f"pair.quant_group_size={GROUP}", "pair.quant_dense_rows=-1"], "must be >= 0"),
    ([f"pair.small_quant=int4", f"pair.quant_group_size={GROUP}", "pair.quant_head_group_size=256"],
     "groups of 256: set pair.quant_head_group_size"),
])
def test_unsupported_quantization_is_one_line(overrides, message):
    with pytest.raises(BildexpError, match=message) as err:
        load_pair(make_config("pair=tiny_llama", *overrides).pair)
    assert "\n" not in str(err.value)


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=600)


def test_bench_steps_compares_int4_group_sizes_in_one_run():
    """scripts/bench_steps.py: `int4-g<N>` rows name their own group size, one row block each, one run; a malformed
    one is a one-line refusal."""
    out = _script("scripts/bench_steps.py", "--pair", "tiny_llama", "--dtypes", "float32", "--backends", "dynamic",
                  "--ks", "1", "--reps", "1", "--small-quants", "int4-g32,int4-g64")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("float32")]
    assert [r[1] for r in rows] == ["int4-g32", "int4-g64"] and all(float(r[5]) > 0 for r in rows)
    head = _script("scripts/bench_steps.py", "--pair", "tiny_llama", "--dtypes", "float32", "--backends", "dynamic",
                   "--ks", "1", "--reps", "1", "--small-quants", "int4-g32", "--head-group-size", "64")
    assert head.returncode == 0, head.stderr
    assert "(int4 LM head in groups of 64)" in head.stdout and len([l for l in head.stdout.splitlines() if l.startswith("float32")]) == 1
    bad = _script("scripts/bench_steps.py", "--pair", "tiny_llama", "--small-quants", "int4-gx")
    assert bad.returncode != 0 and "is not a quantization" in bad.stderr


def test_draft_agreement_takes_group_sizes_and_config_overrides():
    """scripts/draft_agreement.py on another pair (a trailing override), one agreement line per int4 group size."""
    out = _script("scripts/draft_agreement.py", "--experiment", "qwen25_int4_wmt", "--limit", "2", "--quants", "none,int4",
                  "--group-sizes", "32,64", "pair=tiny_llama", "task.max_new_tokens=6")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("small ")]
    assert [line.split(":")[0] for line in lines] == ["small none", "small int4 g32", "small int4 g64"]
    assert "pair tiny_llama, task wmt (2 examples" in out.stdout
    assert all(0.0 <= float(line.rsplit(" ", 1)[1]) <= 1.0 for line in lines)
    head = _script("scripts/draft_agreement.py", "--experiment", "qwen25_int4_wmt", "--limit", "1", "--quants", "int4",
                   "--group-sizes", "32", "pair=tiny_llama", "pair.quant_head_group_size=64", "task.max_new_tokens=4")
    assert head.returncode == 0, head.stderr  # the head's group from the pair's setting (or --head-group-size)
    assert "small int4 g32, head g64: top-1 agreement" in head.stdout


def test_bench_prompt_head_times_both_models_both_ways():
    """scripts/bench_prompt_head.py: a row per model and prompt length, the head on every position and on the last."""
    out = _script("scripts/bench_prompt_head.py", "--pair", "tiny_llama", "--lengths", "20", "--threads", "1", "--reps", "1")
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| large") or line.startswith("| small")]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [("large", "20"), ("small", "20")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
