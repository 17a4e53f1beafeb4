"""`bildexp train`: fine-tune a seq2seq or causal LM on a task's training split, or train one from scratch.

A run writes to train.output_dir:
    checkpoint/        the latest checkpoint (model, tokenizer, optimizer/scheduler/RNG state, step)
    train_log.jsonl    training loss every 10 steps and each validation (loss, task metric)
    final/             the trained model + tokenizer, and manifest.json (command, data, seed, sha256, time)

Running the same command again resumes from checkpoint/ (batches are a pure function of seed and step,
so a resumed run sees the same data as an uninterrupted one); a finished run is not redone. Validation
decodes with the harness's own vanilla policy, so the metric is the one `bildexp run` reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bildexp import BildexpError, file_sha256, metrics
from bildexp.config import PolicyConfig, TrainRunConfig
from bildexp.layerwise import ExitHeads, decoder_layers, exit_head
from bildexp.layerwise import first_layers
from bildexp.models import assemble_pair, load_model, load_tokenizer, resolve_device
from bildexp.policies import make_policy
from bildexp.tasks import Example, TaskData, decode, encode, load_task, load_train, read_jsonl

LOG_EVERY = 10


# ---------------------------------------------------------------------------------------------- data
def encode_examples(examples: list[Example], task_cfg, pair, max_target: int) -> list[tuple[list[int], list[int]]]:
    """Examples → (input ids, label ids). Seq2seq: source / reference+eos. Causal: prompt+reference+eos,
    with the prompt's labels masked (-100) so only the continuation is learned."""
    tok, items = pair.tokenizer, []
    for ex in examples:
        prompt, _ = encode(ex, task_cfg, pair)
        if pair.is_encoder_decoder:
            items.append((prompt.encoder_input_ids[0].tolist(), tok(text_target=ex.reference).input_ids[:max_target]))
            continue
        # A plain-text prompt is continued after a space, as free text would be; a chat turn directly.
        sep = "" if getattr(tok, "chat_template", None) or task_cfg.prompt_template[-1:].isspace() else " "
        target = tok(sep + ex.reference, add_special_tokens=False).input_ids[: max_target - 1] + [pair.eos_token_ids[0]]
        items.append((prompt.decoder_prefix + target, [-100] * len(prompt.decoder_prefix) + target))
    return items


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A deterministic epoch: shuffle, sort within windows of 50 batches by length (less padding), shuffle batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long, device=device)

    inputs, labels = [i for i, _ in items], [lab for _, lab in items]
    # Seq2seq: inputs are the encoder's, labels the decoder's (the model shifts them right itself).
    # Causal: inputs and labels are aligned and the model shifts labels itself.
    return {"input_ids": pad(inputs, pad_id), "attention_mask": pad([[1] * len(s) for s in inputs], 0), "labels": pad(labels, -100)}


def pad_token(pair) -> int:
    tok = pair.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else pair.eos_token_ids[0]


def loss_of(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens, as model(**batch).loss, but for decoder-only models the
    LM head runs only where a label is: with long prompts and a large vocabulary (SmolLM2: 600 prompt
    tokens, 49152 words, ~30 target tokens) that skips almost all of the head's work and memory."""
    if model.config.is_encoder_decoder:
        return model(**batch).loss
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [n_labelled, V]
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def layer_states(model, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward over a batch → (hidden states after layers 1..n-1 at the labelled positions, each
    [n_labelled, D]; the last layer's logits there [n_labelled, V]; the labels [n_labelled])."""
    n = len(decoder_layers(model))
    if model.config.is_encoder_decoder:
        out = model(**batch, output_hidden_states=True)
        hidden, labels = out.decoder_hidden_states, batch["labels"]  # hidden[i]: after layer i (i < n)
        keep = labels != -100
        last = out.logits[keep]
    else:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = [h[:, :-1] for h in out.hidden_states]  # position t predicts token t + 1
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        last = model.get_output_embeddings()(hidden[n][keep])  # hidden[n] is already normed
    return [hidden[i][keep] for i in range(1, n)], last, labels[keep]


def exit_loss_of(model, batch: dict, kind: str, exit_layer: int) -> torch.Tensor:
    """Early-exit training loss: a weighted sum of the cross-entropies of exits after several layers.

    bild: 1/2 (L_exit_layer + L_last) (BiLD Section 4.4); calm: sum_i w_i L_i, w_i = i / sum_j j (CALM).
    """
    n = len(decoder_layers(model))
    if kind == "bild":
        if not 1 <= exit_layer < n:
            raise BildexpError(f"train.exit_layer={exit_layer} must be in [1, {n - 1}] for a {n}-layer decoder")
        weights = {exit_layer: 0.5, n: 0.5}
    else:
        weights = {i: i / (n * (n + 1) / 2) for i in range(1, n + 1)}
    hidden, last, target = layer_states(model, batch)
    loss = torch.zeros((), device=target.device)
    for layer, w in weights.items():
        logits = last if layer == n else exit_head(model, hidden[layer - 1])  # [n_labelled, V]
        loss = loss + w * torch.nn.functional.cross_entropy(logits.float(), target)
    return loss


def heads_loss_of(model, heads: ExitHeads, batch: dict) -> torch.Tensor:
    """PPD's per-layer heads: the mean cross-entropy of each trained head on the frozen model's states."""
    with torch.no_grad():
        hidden, _, target = layer_states(model, batch)
    losses = [torch.nn.functional.cross_entropy(head(hidden[layer - 1]).float(), target) for layer, head in heads.items()]
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------- model
def train_sentencepiece(examples: list[Example], vocab_size: int, out: Path):
    """A SentencePiece unigram model on sources and references, wrapped as a T5 tokenizer."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = out / "spm_train.txt"
    text.write_text("".join(f"{ex.source}\n{ex.reference}\n" for ex in examples), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "spiece"), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
        input_sentence_size=200_000, shuffle_input_sentence=True, seed_sentencepiece_size=200_000,
    )
    text.unlink()
    # T5Tokenizer(vocab_file=...) ignores the file in transformers 5; from_pretrained reads it (ENVIRONMENT.md).
    return T5Tokenizer.from_pretrained(str(out), legacy=False, extra_ids=0)


def scratch_model(arch: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    kwargs = {k: v for k, v in arch.items() if k != "type"}
    if arch["type"] == "t5":
        config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **kwargs)
        return T5ForConditionalGeneration(config)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return LlamaForCausalLM(config)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, model, tokenizer, opt, sched, step: int, elapsed_s: float, heads=None) -> None:
    """Write checkpoint.tmp, then swap it in, so a crash at any moment leaves one whole checkpoint."""
    tmp, ckpt, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if heads is not None:
        heads.save(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "elapsed_s": elapsed_s}, tmp / "trainer_state.pt")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old only survives a crash between the two renames
        if (out / name / "trainer_state.pt").is_file():
            return out / name
    return None


# --------------------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(model, pair, items, examples: list[Example], task_cfg, n_decode: int, batch_size: int) -> dict:
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(items), batch_size):
        batch = collate(items[b : b + batch_size], pad_token(pair), pair.device)
        n_tok = int((batch["labels"] != -100).sum())
        total += float(loss_of(model, batch)) * n_tok
        count += n_tok
    policy = make_policy(PolicyConfig(name="vanilla", which="large"))
    hyps = [decode(policy.decode(pair, encode(ex, task_cfg, pair)[0], task_cfg.max_new_tokens).tokens, pair) for ex in examples[:n_decode]]
    scores = metrics.score(task_cfg.metric, hyps, [ex.reference for ex in examples[:n_decode]])
    model.train()
    return {"eval_loss": total / max(count, 1), task_cfg.metric: float(scores[task_cfg.metric]), "eval_decoded": len(hyps)}


# ---------------------------------------------------------------------------------------------- main
def train(cfg: TrainRunConfig, command: str = "") -> Path:
    """Train (or resume, or skip a finished run); return the final model folder."""
    tc, task_cfg = cfg.train, cfg.task
    out = Path(tc.output_dir)
    final = out / "final"
    if (final / "manifest.json").is_file():
        print(f"{final} is already trained (delete it to train again)", file=sys.stderr)
        return final
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    t_start = time.perf_counter()

    data = TaskData(read_jsonl(Path(tc.data_file)), f"local:{tc.data_file}", "file") if tc.data_file else load_train(task_cfg)
    eval_examples = load_task(task_cfg, limit=tc.eval_examples).examples

    ckpt = find_checkpoint(out)
    if ckpt is not None:
        tokenizer, model = load_tokenizer(str(ckpt)), load_model(str(ckpt), torch.float32, device)
    else:
        if tc.init is not None:
            tokenizer = load_tokenizer(tc.tokenizer or tc.init)
            model = load_model(tc.init, torch.float32, device)
            if tc.init_layers is not None:
                model = first_layers(model, tc.init_layers)
        else:
            tokenizer = load_tokenizer(tc.tokenizer) if tc.tokenizer else train_sentencepiece(data.examples, tc.vocab_size, out / "tokenizer")
            model = scratch_model(tc.arch, tokenizer).to(device)
    pair = assemble_pair(tc.name, model, model, tokenizer, device, torch.float32)
    items = encode_examples(data.examples, task_cfg, pair, tc.max_target_tokens)
    eval_items = encode_examples(eval_examples, task_cfg, pair, tc.max_target_tokens)
    lengths = [len(i) + len(lab) for i, lab in items]

    # PPD head training: the model is frozen (and in eval mode: no dropout on the features), only the heads learn.
    heads = ExitHeads(model, tc.exit_heads) if tc.exit_heads else None
    if heads is not None:
        model.requires_grad_(False)
        if ckpt is not None:
            heads = ExitHeads.load(ckpt, model).train()
    trainable = list((heads if heads is not None else model).parameters())
    opt = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, tc.steps))
    step, elapsed_before = 0, 0.0  # training seconds spent by earlier (interrupted) runs
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        print(f"resuming {tc.name} from step {step} ({ckpt})", file=sys.stderr)

    log = (out / "train_log.jsonl").open("a", encoding="utf-8")
    n_params = sum(p.numel() for p in trainable)  # the heads alone when training exit heads
    print(f"{tc.name}: {n_params / 1e6:.2f}M params, {len(items)} training examples ({data.data_source}), "
          f"{tc.steps} steps of {tc.batch_size}, device {device}, threads {torch.get_num_threads()}", file=sys.stderr)
    model.train(heads is None)
    batches: list[list[int]] = []
    epoch_of_batches = -1
    running: list[float] = []
    bar = tqdm(range(step, tc.steps), initial=step, total=tc.steps, desc=tc.name, disable=not tc.progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    last_eval: dict = {}
    for step in bar:
        epoch, index = divmod(step, math.ceil(len(items) / tc.batch_size))
        if epoch != epoch_of_batches:
            batches, epoch_of_batches = epoch_batches(lengths, tc.batch_size, tc.seed, epoch), epoch
        batch = collate([items[i] for i in batches[index]], pad_token(pair), device)
        if heads is not None:
            loss = heads_loss_of(model, heads, batch)
        elif tc.exit_loss != "none":
            loss = exit_loss_of(model, batch, tc.exit_loss, tc.exit_layer)
        else:
            loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        opt.step()
        sched.step()
        running.append(loss.item())
        done = step + 1
        if done % LOG_EVERY == 0:
            mean = sum(running) / len(running)
            running.clear()
            bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
            log.write(json.dumps({"step": done, "loss": mean, "lr": sched.get_last_lr()[0]}) + "\n")
        if done % tc.eval_every == 0 or done == tc.steps:
            last_eval = {"step": done, **evaluate(model, pair, eval_items, eval_examples, task_cfg, tc.eval_decode, tc.batch_size)}
            log.write(json.dumps(last_eval) + "\n")
            tqdm.write(f"step {done}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items() if k != "step"), file=sys.stderr)
        log.flush()
        if done % tc.save_every == 0 or done == tc.steps:
            save_checkpoint(out, model, tokenizer, opt, sched, done, elapsed_before + time.perf_counter() - t_start, heads)
    bar.close()
    log.close()

    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if heads is not None:
        heads.save(tmp)
    weights = tmp / ("exit_heads.safetensors" if heads is not None else "model.safetensors")
    manifest = {
        "name": tc.name,
        "command": command,
        "config": {"task": dataclasses.asdict(task_cfg), "train": dataclasses.asdict(tc)},
        "data": data.data_source,
        "data_split": data.split,
        "examples": len(items),
        "seed": tc.seed,
        "params": n_params,
        "sha256": file_sha256(weights),
        "time_s": round(elapsed_before + time.perf_counter() - t_start, 1),  # all runs, resumed ones included
        "time_s_this_run": round(time.perf_counter() - t_start, 1),
        "final_eval": last_eval,
        "torch_version": torch.__version__,
        "device": device.type,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, final)
    print(f"trained {tc.name}: {final}", file=sys.stderr)
    return final
