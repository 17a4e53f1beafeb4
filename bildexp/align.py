"""`bildexp align`: BiLD's prediction alignment (Section 3.5.1).

1. Calibration set: the large model's greedy outputs on inputs from the task's TRAINING split (never an
   evaluation example: overlaps by id or source text are dropped and counted), written to
   calibration.jsonl as {id, source, reference = large output}; resumable, and reusable later.
2. Top-1 agreement before: on the first evaluation examples, along the large model's own greedy
   outputs, how often the small model's argmax is the large model's token.
3. The small model is fine-tuned on the calibration set with `bildexp train`'s trainer.
4. Top-1 agreement after, with the aligned small model; everything lands in report.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bildexp.cache import ModelState
from bildexp.config import AlignRunConfig, PolicyConfig, TrainRunConfig
from bildexp.models import ModelPair, load_model, load_pair
from bildexp.policies import Prompt, make_policy
from bildexp.results import resume_jsonl
from bildexp.tasks import decode, encode, load_task, load_train, read_jsonl
from bildexp.train import train


def greedy_outputs(pair: ModelPair, prompts: list[Prompt], max_new: int, desc: str, progress: bool) -> list[list[int]]:
    policy = make_policy(PolicyConfig(name="vanilla", which="large"))
    return [policy.decode(pair, p, max_new).tokens for p in tqdm(prompts, desc=desc, disable=not progress, file=sys.stderr)]


@torch.inference_mode()
def top1_agreement(model, prompts: list[Prompt], outputs: list[list[int]]) -> float:
    """Share of positions where model's argmax equals the given (large-model greedy) token, teacher-forced."""
    hits = total = 0
    for prompt, out in zip(prompts, outputs):
        if not out:
            continue
        state = ModelState(model, prompt.encoder_input_ids)
        seq = torch.tensor([prompt.decoder_prefix + out[:-1]], device=model.device)
        logits = state.advance(seq, keep=len(out))  # logits[j] predicts out[j]
        hits += int((logits.argmax(-1).cpu() == torch.tensor(out)).sum())
        total += len(out)
    return hits / max(total, 1)


def calibration_set(cfg: AlignRunConfig, pair: ModelPair, path: Path) -> dict:
    """Write (or finish writing) calibration.jsonl; return counts."""
    eval_examples = load_task(cfg.task).examples  # the whole evaluation split is off limits
    eval_ids = {ex.id for ex in eval_examples}
    eval_sources = {ex.source for ex in eval_examples}
    src = cfg.align.calibration_file
    candidates = read_jsonl(Path(src)) if src else load_train(cfg.task).examples
    kept = [ex for ex in candidates if ex.id not in eval_ids and ex.source not in eval_sources]
    inputs = kept[: cfg.align.calibration_examples]
    done = {r["id"] for r in resume_jsonl(path)}
    todo = [ex for ex in inputs if ex.id not in done]
    policy = make_policy(PolicyConfig(name="vanilla", which="large"))
    with path.open("a", encoding="utf-8") as f:
        for ex in tqdm(todo, desc="calibration (large greedy)", disable=not cfg.align.progress, file=sys.stderr):
            tokens = policy.decode(pair, encode(ex, cfg.task, pair)[0], cfg.task.max_new_tokens).tokens
            f.write(json.dumps({"id": ex.id, "source": ex.source, "reference": decode(tokens, pair)}, ensure_ascii=False) + "\n")
            f.flush()
    return {"calibration_examples": len(inputs), "calibration_source": src or "task training split",
            "dropped_eval_overlap": len(candidates) - len(kept)}


def align(cfg: AlignRunConfig, command: str = "") -> dict:
    out = Path(cfg.align.output_dir)
    if (out / "report.json").is_file():  # finished: `bildexp reproduce` runs its prepare steps again on resume
        print(f"{out} is already aligned (delete {out / 'report.json'} to align again)", file=sys.stderr)
        return json.loads((out / "report.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.pair.threads)
    pair = load_pair(cfg.pair)
    eval_examples = load_task(cfg.task, limit=cfg.align.agreement_examples).examples
    counts = calibration_set(cfg, pair, out / "calibration.jsonl")

    prompts = [encode(ex, cfg.task, pair)[0] for ex in eval_examples]
    large_out = greedy_outputs(pair, prompts, cfg.task.max_new_tokens, "agreement set (large greedy)", cfg.align.progress)
    before = top1_agreement(pair.small, prompts, large_out)
    print(f"top-1 agreement before alignment: {before:.4f}", file=sys.stderr)

    recipe = dataclasses.replace(
        cfg.train, init=cfg.pair.small, tokenizer=cfg.pair.tokenizer or cfg.pair.large,
        data_file=str(out / "calibration.jsonl"), output_dir=str(out / "small"), name=f"{cfg.pair.name}_small_aligned",
    )
    final = train(TrainRunConfig(task=cfg.task, train=recipe), command)
    aligned = load_model(str(final), pair.dtype, pair.device)
    after = top1_agreement(aligned, prompts, large_out)
    report = {
        "pair": cfg.pair.name, "task": cfg.task.name, **counts,
        "agreement_examples": len(eval_examples), "agreement_tokens": sum(len(o) for o in large_out),
        "top1_agreement_before": before, "top1_agreement_after": after,
        "aligned_small": str(final), "calibration_file": str(out / "calibration.jsonl"), "command": command,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"top-1 agreement: {before:.4f} before, {after:.4f} after alignment; aligned small model: {final}", file=sys.stderr)
    return report
