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
