"""Tasks: where examples come from (hub, local JSONL, built-in toy data) and how they become prompts.

The task configs in conf/task/ name the hub dataset (for users with network access), the file in
../shared/data that holds the same task offline, the source prefix or prompt template, the length
limits and the headline metric. Every loaded task reports which source and split it really used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bildexp import PROJECT_ROOT, BildexpError
from bildexp.config import TaskConfig
from bildexp.models import ModelPair
from bildexp.policies import Prompt


@dataclass
class Example:
    id: str
    source: str
    reference: str


@dataclass
class TaskData:
    examples: list[Example]
    data_source: str  # e.g. "local:iwslt2017_de_en/tst2017.jsonl", "hub:iwslt2017/iwslt2017-de-en", "builtin:toy"
    split: str


def default_data_dir() -> Path:
    env = os.environ.get("BILDEXP_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise BildexpError(f"data file {path} not found: pass task.data_file=PATH to a JSONL of {{id, source, reference}} rows")
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"id", "source", "reference"} - row.keys()
            if missing:
                raise BildexpError(f"{path}:{line_no} lacks {', '.join(sorted(missing))}: rows must be {{id, source, reference}}")
            examples.append(Example(str(row["id"]), row["source"], row["reference"]))
    return examples


def _field(row: dict, dotted: str) -> str:
    for part in dotted.split("."):
        row = row[part]
    return row  # type: ignore[return-value]


def load_hub(cfg: TaskConfig) -> list[Example]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hub_dataset, cfg.hub_config, split=cfg.split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise BildexpError(
            f"cannot load dataset {cfg.hub_dataset} ({cfg.hub_config}, {cfg.split}) from the HF hub: "
            f"{type(err).__name__}; without network pass task.data_file=PATH to a local JSONL"
        ) from None
    return [Example(str(row.get("id", i)), _field(row, cfg.source_field), _field(row, cfg.target_field)) for i, row in enumerate(ds)]


def load_train(cfg: TaskConfig, limit: int | None = None) -> TaskData:
    """The task's training split (never its evaluation examples): local train_file, built-in, or the hub."""
    if cfg.data_source == "builtin":
        from bildexp.toy import toy_examples

        data = TaskData([Example(**r) for r in toy_examples("train")], f"builtin:{cfg.name}", "train")
    else:
        local = default_data_dir() / cfg.train_file if cfg.train_file else None
        if local is not None and local.is_file() and cfg.data_source != "hub":
            data = TaskData(read_jsonl(local), f"local:{cfg.train_file}", "train")
        elif cfg.hub_dataset is None or cfg.data_source == "local":
            raise BildexpError(f"task {cfg.name} has no training data here: pass train.data_file=PATH to a JSONL")
        else:
            hub = dataclasses.replace(cfg, split=cfg.train_split)
            data = TaskData(load_hub(hub), f"hub:{cfg.hub_dataset}/{cfg.hub_config}", cfg.train_split)
    data.examples = data.examples[:limit] if limit is not None else data.examples
    return data


def load_task(cfg: TaskConfig, limit: int | None = None) -> TaskData:
    """The task's evaluation examples."""
    if cfg.data_file is not None:
        data = TaskData(read_jsonl(Path(cfg.data_file)), f"local:{cfg.data_file}", cfg.local_split or "file")
    elif cfg.data_source == "builtin":
        from bildexp.toy import toy_examples

        rows = toy_examples(cfg.split)
        data = TaskData([Example(**r) for r in rows], f"builtin:{cfg.name}", cfg.split)
    else:
        local = default_data_dir() / cfg.local_file if cfg.local_file else None
        use_local = cfg.data_source == "local" or (cfg.data_source == "auto" and local is not None and local.is_file())
        if use_local:
            if local is None:
                raise BildexpError(f"task {cfg.name} has no local file: pass task.data_file=PATH")
            data = TaskData(read_jsonl(local), f"local:{cfg.local_file}", cfg.local_split or "unknown")
        elif cfg.hub_dataset is None:
            raise BildexpError(f"task {cfg.name} has neither a local file nor a hub dataset: pass task.data_file=PATH")
        else:
            data = TaskData(load_hub(cfg), f"hub:{cfg.hub_dataset}/{cfg.hub_config}", cfg.split)
    if not data.examples:
        raise BildexpError(f"task {cfg.name}: {data.data_source} holds no examples")
    if limit is not None:
        data.examples = data.examples[:limit]
    return data


def encode(example: Example, cfg: TaskConfig, pair: ModelPair) -> tuple[Prompt, bool]:
    """Example → (Prompt, whether the source was truncated to cfg.max_source_tokens)."""
    tok = pair.tokenizer
    if pair.is_encoder_decoder:
        ids = tok(cfg.prefix + example.source).input_ids
        truncated = len(ids) > cfg.max_source_tokens
        if truncated:
            # Keep the closing eos the tokenizer appends (T5 expects it).
            tail = [ids[-1]] if ids[-1] == tok.eos_token_id else []
            ids = ids[: cfg.max_source_tokens - len(tail)] + tail
        enc = torch.tensor([ids], dtype=torch.long, device=pair.device)
        return Prompt([pair.decoder_start_token_id], enc), truncated

    src_ids = tok(example.source, add_special_tokens=False).input_ids
    truncated = len(src_ids) > cfg.max_source_tokens
    source = tok.decode(src_ids[: cfg.max_source_tokens]) if truncated else example.source
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": cfg.instruction + source}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tok(cfg.prompt_template.replace("{source}", source)).input_ids
    return Prompt(list(ids)), truncated


def decode(tokens: list[int], pair: ModelPair) -> str:
    return pair.tokenizer.decode(tokens, skip_special_tokens=True).strip()
