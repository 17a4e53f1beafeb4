"""Testbed plumbing: project-relative model folders, missing local weights, exporting trained weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bildexp import PROJECT_ROOT, BildexpError, file_sha256
from bildexp.config import PairConfig
from bildexp.models import load_model, load_pair, resolve_path


def test_relative_folders_resolve_against_the_project_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("conf/pair") == str(PROJECT_ROOT / "conf" / "pair")
    (tmp_path / "conf" / "pair").mkdir(parents=True)  # a folder in the working directory wins
    assert resolve_path("conf/pair") == "conf/pair"
    assert resolve_path("org/some-hub-id") == "org/some-hub-id"


def test_missing_local_weights_name_the_command_that_builds_them():
    cfg = PairConfig(name="p", large="builtin:tiny_t5/large", small="checkpoints/nowhere/final", build="make p")
    with pytest.raises(BildexpError, match=r"checkpoints/nowhere/final of pair p not found: build it with `make p`"):
        load_pair(cfg)


def test_export_stores_bf16_with_a_manifest_that_matches(tmp_path):
    import bildexp.train as train_mod
    from test_train import FAST, train_config  # tests/ is on sys.path (pytest's default import mode)

    final = train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path / 'run'}", *FAST), "cmd")
    dst = tmp_path / "testbed" / "small"
    subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "export_model.py"), str(final), str(dst), "--note", "n"],
                   check=True, capture_output=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["sha256"] == file_sha256(dst / "model.safetensors") != manifest["trained_weights_sha256"]
    assert manifest["stored_dtype"] == "bfloat16" and manifest["command"] == "cmd" and manifest["note"] == "n"
    fp32, stored = load_model(str(final), torch.float32, torch.device("cpu")), load_model(str(dst), torch.float32, torch.device("cpu"))
    for (name, a), (_, b) in zip(fp32.state_dict().items(), stored.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b), name


# ------------------------------------------------------------------ the committed t5_multi30k testbed
TESTBED = PROJECT_ROOT / "testbeds" / "t5_multi30k"


@pytest.mark.parametrize("role", ["large", "small", "small_aligned", "early_exit", "calm"])
def test_committed_weights_match_their_manifests(role):
    manifest = json.loads((TESTBED / role / "manifest.json").read_text())
    assert file_sha256(TESTBED / role / "model.safetensors") == manifest["sha256"]
    assert manifest["data"].startswith("local:multi30k_de_en/") or "calibration" in manifest["data"]
    assert manifest["seed"] == 0 and manifest["command"].startswith("bildexp ") and manifest["time_s"] > 0


@pytest.fixture(scope="module")
def multi30k():
    from conftest import make_config
    from test_exactness import hf_greedy, prompts

    from bildexp.tasks import load_task

    cfg = make_config("task=multi30k", "pair=t5_multi30k_aligned")
    pair = load_pair(cfg.pair)
    ps = prompts(pair, load_task(cfg.task, limit=12).examples, cfg.task)
    return pair, ps, [hf_greedy(pair.large, pair, p) for p in ps], [hf_greedy(pair.small, pair, p) for p in ps]


def test_real_pair_disagrees_and_bild_without_rollback_tolerance_equals_large_greedy(multi30k):
    from test_exactness import run_policy

    pair, ps, large_ref, small_ref = multi30k
    assert sum(a != b for a, b in zip(large_ref, small_ref)) >= 3, "the trained small and large models should differ"
    for fallback in (0.0, 0.5, 0.9):
        out = run_policy(pair, ps, name="bild", fallback_threshold=fallback, rollback_threshold=0.0, max_small_steps=10)
        assert [g.tokens for g in out] == large_ref, fallback
        assert sum(g.counters["small_tokens"] for g in out) > 0


def test_real_pair_speculative_and_assisted_equal_large_greedy(multi30k):
    from test_exactness import run_policy

    pair, ps, large_ref, _ = multi30k
    for name in ("speculative", "hf_assisted"):
        out = run_policy(pair, ps, name=name, num_draft_tokens=4)
        assert [g.tokens for g in out] == large_ref, name
        if name == "speculative":  # drafts were both accepted and rejected
            assert sum(g.counters["accepted_tokens"] for g in out) > 0 and sum(g.counters["tokens_rolled_back"] for g in out) > 0


@pytest.mark.parametrize("pair_name", ["t5_multi30k_early_exit", "t5_multi30k_calm"])
def test_real_early_exit_models_are_lossless_at_their_exact_settings(pair_name):
    """The fine-tuned early-exit models: BiLD early exit with rollback 0 and CALM that never exits both
    equal the model's own greedy output, while the first-layer exit really disagrees with it."""
    from conftest import make_config
    from test_exactness import hf_greedy, prompts, run_policy

    from bildexp.tasks import load_task

    cfg = make_config("task=multi30k", f"pair={pair_name}")
    pair = load_pair(cfg.pair)
    ps = prompts(pair, load_task(cfg.task, limit=12).examples, cfg.task)
    ref = [hf_greedy(pair.large, pair, p) for p in ps]
    first_layer = run_policy(pair, ps, name="vanilla", which="small")
    assert sum(g.tokens != r for g, r in zip(first_layer, ref)) >= 3
    bild = run_policy(pair, ps, name="bild", fallback_threshold=0.3, rollback_threshold=0.0)
    assert [g.tokens for g in bild] == ref and sum(g.counters["small_tokens"] for g in bild) > 0
    calm = run_policy(pair, ps, name="calm", exit_threshold=1.0, exit_decay=0.0)
    assert [g.tokens for g in calm] == ref
