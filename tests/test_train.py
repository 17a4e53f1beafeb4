"""`bildexp train`: fine-tunes and trains from scratch, validates, resumes to the same weights, skips finished runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import bildexp.train as train_mod
from bildexp import BildexpError
from bildexp.config import CONF_DIR
from bildexp.config import register_configs, to_train_config
from bildexp.models import resolve_path

FAST = ["train.steps=20", "train.save_every=10", "train.eval_every=20", "train.eval_examples=16", "train.eval_decode=4"]


def train_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fine_tune_writes_model_log_and_manifest(tmp_path):
    final = train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path}", *FAST), "cmd")
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["sha256"] == sha(final / "model.safetensors") and manifest["command"] == "cmd"
    assert manifest["data"] == "builtin:toy" and manifest["seed"] == 0
    evals = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [20] and 0 <= evals[0]["bleu"] <= 100 and evals[0]["eval_decoded"] == 4
    init = resolve_path("builtin:tiny_t5/small")
    assert sha(final / "model.safetensors") != sha(Path(init) / "model.safetensors")


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    whole = train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path / 'a'}", *FAST))

    real_save = train_mod.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the machine stopped right after step 10's checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path / 'b'}", *FAST))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path / 'b'}", *FAST))
    assert sha(resumed / "model.safetensors") == sha(whole / "model.safetensors")
    # The manifest's time counts the interrupted run too.
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["time_s"] > manifest["time_s_this_run"] > 0
    # The finished run is not redone.
    mtime = (resumed / "model.safetensors").stat().st_mtime
    assert train_mod.train(train_config("train=tiny_t5_toy", f"train.output_dir={tmp_path / 'b'}", *FAST)) == resumed
    assert (resumed / "model.safetensors").stat().st_mtime == mtime


def test_from_scratch_decoder_only(tmp_path):
    final = train_mod.train(train_config("train=tiny_llama_scratch", f"train.output_dir={tmp_path}", "train.steps=10", "train.eval_every=10", "train.eval_decode=2"))
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["params"] < 200_000 and manifest["final_eval"]["step"] == 10


def test_recipe_without_model_is_one_line():
    with pytest.raises(BildexpError, match="set train.init"):
        train_config("train=tiny_t5_toy", "train.init=null")  # no arch either


def test_draft_from_the_first_layers_of_a_larger_model(tmp_path):
    final = train_mod.train(train_config("train=tiny_t5_toy", "train.init=builtin:tiny_t5/large", "train.init_layers=1",
                                         f"train.output_dir={tmp_path}", "train.steps=5", "train.eval_every=5", "train.eval_decode=2"))
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(final)
    assert cfg.num_decoder_layers == 1 and cfg.num_layers == transformers.AutoConfig.from_pretrained(resolve_path("builtin:tiny_t5/large")).num_layers


def test_head_only_at_labels_equals_the_models_own_loss(tiny_pair, toy_examples):

    model = tiny_pair.large
    task = train_config("train=tiny_llama_scratch").task
    items = train_mod.encode_examples(toy_examples[:4], task, tiny_pair, 48)
    batch = train_mod.collate(items, train_mod.pad_token(tiny_pair), tiny_pair.device)


    with torch.no_grad():
        torch.testing.assert_close(train_mod.loss_of(model, batch), model(**batch).loss, atol=1e-5, rtol=1e-5)


def test_data_file_needs_no_training_split(tmp_path):
    """xsum has no training split offline: a data_file (an alignment calibration set) must suffice."""
    rows = [{"id": f"c{i}", "source": "a short news text", "reference": "a summary"} for i in range(8)]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = train_mod.train(train_config("task=xsum", "train=tiny_llama_scratch", f"train.data_file={tmp_path / 'calib.jsonl'}",
                                         f"train.output_dir={tmp_path / 'out'}", "train.steps=2", "train.eval_every=2",
                                         "train.eval_examples=2", "train.eval_decode=1", "task.max_new_tokens=4"))
    assert json.loads((final / "manifest.json").read_text())["data"].endswith("calib.jsonl")
