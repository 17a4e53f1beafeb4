"""`bildexp align`: calibration set from the large model's outputs, top-1 agreement, aligned small model."""

from __future__ import annotations

import json

from hydra import compose, initialize_config_dir

from bildexp.align import align, top1_agreement
from bildexp.config import CONF_DIR
from bildexp.config import AlignRunConfig, PolicyConfig, register_configs, to_train_config
from bildexp.models import load_pair
from bildexp.policies import make_policy
from bildexp.tasks import Example, encode, load_task


def align_config(*overrides: str) -> AlignRunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = compose(config_name="align", overrides=list(overrides))
    dcfg.train.init = dcfg.pair.small
    return to_train_config(dcfg, AlignRunConfig)


def test_large_agrees_with_itself_and_small_does_not(tiny_pair):
    cfg = align_config()  # only its task (toy) is used: the prompts are built for tiny_pair
    exs = load_task(cfg.task, limit=10).examples
    prompts = [encode(ex, cfg.task, tiny_pair)[0] for ex in exs]
    policy = make_policy(PolicyConfig(name="vanilla"))
    outs = [policy.decode(tiny_pair, p, 40).tokens for p in prompts]
    assert top1_agreement(tiny_pair.large, prompts, outs) == 1.0  # index bookkeeping: logits[j] predicts out[j]
    assert 0.3 < top1_agreement(tiny_pair.small, prompts, outs) < 1.0


def test_align_end_to_end(tmp_path):
    out = tmp_path / "aligned"
    cfg = align_config(
        "align.calibration_examples=300", "align.agreement_examples=40", f"align.output_dir={out}", "align.progress=false",
        "train.steps=120", "train.lr=1e-3", "train.eval_every=120", "train.eval_examples=16", "train.eval_decode=4", "train.device=cpu",
    )
    report = align(cfg)
    calib = [json.loads(x) for x in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(calib) == 300 and all(r["id"].startswith("toy-train-") for r in calib)
    # The references are the large model's greedy outputs, not the task's references.
    pair = load_pair(cfg.pair)
    prompt, _ = encode(Example(calib[0]["id"], calib[0]["source"], ""), cfg.task, pair)
    first = make_policy(PolicyConfig(name="vanilla")).decode(pair, prompt, cfg.task.max_new_tokens)
    assert calib[0]["reference"] == pair.tokenizer.decode(first.tokens, skip_special_tokens=True).strip()
    assert report["top1_agreement_after"] > report["top1_agreement_before"]
    assert json.loads((out / "report.json").read_text())["aligned_small"] == str(out / "small" / "final")
    # A finished alignment is not redone (bildexp reproduce runs its prepare steps again when it resumes).
    assert align(cfg) == report
