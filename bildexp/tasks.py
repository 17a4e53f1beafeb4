"""Tasks: where examples come from (hub, local JSONL, built-in toy data) and how they become prompts.

The task configs in conf/task/ name the hub dataset (for users with network access), the file in
../shared/data that holds the same task offline, the source prefix or prompt template, the length
limits and the headline metric. Every loaded task reports which source and split it really used.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bildexp import PROJECT_ROOT, BildexpError, hub_offline
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
    data_source: str  # e.g. "local:iwslt2017_de_en/tst2017.jsonl", "hub:IWSLT/iwslt2017@refs/convert/parquet:iwslt2017-de-en", "builtin:toy"
    split: str


def default_data_dir() -> Path:
    env = os.environ.get("BILDEXP_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def read_jsonl(path: Path, drop_empty: bool = False) -> list[Example]:
    """{"id", "source", "reference"} rows, one JSON object per line; any bad row is one line naming file:line.
    drop_empty: skip rows with an empty source or reference (else an empty source is an error)."""
    return _read_jsonl(path, drop_empty)[0]


def local_data(path: Path, label: str, split: str, drop_empty: bool) -> TaskData:
    """A local JSONL as TaskData; its source names the file and the empty rows dropped."""
    examples, dropped = _read_jsonl(path, drop_empty)
    return TaskData(examples, f"local:{label}" + (f" ({dropped} empty dropped)" if dropped else ""), split)


def _read_jsonl(path: Path, drop_empty: bool) -> tuple[list[Example], int]:
    if not path.is_file():
        raise BildexpError(f"data file {path} not found: pass task.data_file=PATH to a JSONL of {{id, source, reference}} rows")
    examples, seen, dropped = [], {}, 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BildexpError(f"{where} is not valid JSON ({err.msg}, column {err.colno}): one {{id, source, reference}} object per line") from None
            if not isinstance(row, dict):
                raise BildexpError(f"{where} is a JSON {type(row).__name__}, not an object: rows must be {{id, source, reference}}")
            missing = {"id", "source", "reference"} - row.keys()
            if missing:
                raise BildexpError(f"{where} lacks {', '.join(sorted(missing))}: rows must be {{id, source, reference}}")
            for key in ("source", "reference"):
                if not isinstance(row[key], str):
                    raise BildexpError(f"{where}: {key} is {json.dumps(row[key])[:40]}, not a string")
            if drop_empty and not (row["source"].strip() and row["reference"].strip()):
                dropped += 1
                continue
            if not row["source"].strip():
                raise BildexpError(f"{where}: the source is empty: drop the row, fill it, or set task.drop_empty=true")
            example_id = str(row["id"])
            if example_id in seen:
                raise BildexpError(f"{where}: id {example_id!r} repeats line {seen[example_id]}: ids must be unique")
            seen[example_id] = line_no
            examples.append(Example(example_id, row["source"], row["reference"]))
    return examples, dropped


def _field(row: dict, path: str) -> str:
    """A dotted path into a hub row ("translation.de", "answers.text.0"), or a template of such paths."""
    if "{" in path:
        return re.sub(r"\{([^{}]+)\}", lambda m: _field(row, m.group(1)), path)
    value: object = row
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]  # type: ignore[index]
    return value  # type: ignore[return-value]


def _field_names(path: str) -> list[str]:
    return re.findall(r"\{([^{}]+)\}", path) if "{" in path else [path]


def hub_split_files(cfg: TaskConfig, split: str) -> dict[str, list[str]]:
    """The parquet files of each split named in `split` (a split expression: "train[:10%]+validation"),
    fetched into the huggingface_hub cache (or found there offline) at cfg.hub_revision."""
    from huggingface_hub import snapshot_download

    names = list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+")))
    config = cfg.hub_config or "default"
    patterns = {name: cfg.hub_files.format(config=config, split=name) for name in names}
    where = f"dataset {cfg.hub_dataset} at revision {cfg.hub_revision}"
    try:
        folder = Path(snapshot_download(cfg.hub_dataset, repo_type="dataset", revision=cfg.hub_revision,
                                        allow_patterns=list(patterns.values())))
    except Exception as err:  # huggingface_hub raises many types (RepositoryNotFound, RevisionNotFound, LocalEntryNotFound, ...)
        if hub_offline():
            fix = "the HF hub is off (HF_HUB_OFFLINE=1): download it on a machine with network access into this HF cache, or pass task.data_file=PATH to a local JSONL"
        else:
            fix = "check task.hub_dataset and task.hub_revision, and the network, or pass task.data_file=PATH to a local JSONL"
        raise BildexpError(f"cannot fetch {where} ({type(err).__name__}): {fix}") from None
    files = {name: sorted(str(f) for f in folder.glob(pattern)) for name, pattern in patterns.items()}
    for name, found in files.items():
        if not found:
            raise BildexpError(
                f"{where} has no files {patterns[name]}: config {config!r} or split {name!r} is wrong "
                f"(set task.hub_config / task.split / task.hub_files)"
            )
    return files


def load_hub(cfg: TaskConfig, split: str | None = None) -> tuple[list[Example], int]:
    """The rows of cfg.split (or `split`) from the hub's parquet files → (examples, empty rows dropped)."""
    import datasets

    split = split or cfg.split
    files = hub_split_files(cfg, split)
    ds = datasets.load_dataset("parquet", data_files=files, split=split)
    for path in (cfg.source_field, cfg.target_field):
        missing = [f for f in _field_names(path) if f.split(".")[0] not in ds.column_names]
        if missing:
            raise BildexpError(f"dataset {cfg.hub_dataset} ({split}) has no field {missing[0]!r}: its columns are "
                               f"{', '.join(ds.column_names)} (set task.source_field / task.target_field)")
    examples, dropped = [], 0
    for i, row in enumerate(ds):
        try:
            source, reference = _field(row, cfg.source_field), _field(row, cfg.target_field)
        except (KeyError, IndexError, TypeError):
            raise BildexpError(f"dataset {cfg.hub_dataset} ({split}) row {i} lacks {cfg.source_field} or {cfg.target_field}: "
                               f"set task.source_field / task.target_field") from None
        if cfg.drop_empty and not (source.strip() and reference.strip()):
            dropped += 1
            continue
        examples.append(Example(str(row.get("id", i)), source, reference))
    return examples, dropped


def _hub_data(cfg: TaskConfig, split: str) -> TaskData:
    examples, dropped = load_hub(cfg, split)
    config = cfg.hub_config or "default"
    source = f"hub:{cfg.hub_dataset}@{cfg.hub_revision}:{config}" + (f" ({dropped} empty dropped)" if dropped else "")
    full = split == cfg.split and "[" not in split
    if full and cfg.hub_rows is not None and len(examples) + dropped != cfg.hub_rows:
        print(f"bildexp: note: {cfg.hub_dataset} {config}/{split} has {len(examples) + dropped} rows; the paper's split has "
              f"{cfg.hub_rows}", file=sys.stderr)
    return TaskData(examples, source, split)


def load_train(cfg: TaskConfig, limit: int | None = None) -> TaskData:
    """The task's training split (never its evaluation examples): local train_file, built-in, or the hub."""
    if cfg.data_source == "builtin":
        from bildexp.testbeds.toy import toy_examples

        data = TaskData([Example(**r) for r in toy_examples("train")], f"builtin:{cfg.name}", "train")
    else:
        local = default_data_dir() / cfg.train_file if cfg.train_file else None
        if local is not None and local.is_file() and cfg.data_source != "hub":
            data = local_data(local, cfg.train_file, "train", cfg.drop_empty)
        elif cfg.hub_dataset is None or cfg.data_source == "local":
            raise BildexpError(f"task {cfg.name} has no training data here: pass train.data_file=PATH to a JSONL")
        else:
            data = _hub_data(cfg, cfg.train_split)
    data.examples = data.examples[:limit] if limit is not None else data.examples
    return data


def load_task(cfg: TaskConfig, limit: int | None = None) -> TaskData:
    """The task's evaluation examples."""
    if cfg.data_file is not None:
        data = local_data(Path(cfg.data_file), cfg.data_file, cfg.local_split or "file", cfg.drop_empty)
    elif cfg.data_source == "builtin":
        from bildexp.testbeds.toy import toy_examples

        rows = toy_examples(cfg.split)
        data = TaskData([Example(**r) for r in rows], f"builtin:{cfg.name}", cfg.split)
    else:
        local = default_data_dir() / cfg.local_file if cfg.local_file else None
        use_local = cfg.data_source == "local" or (cfg.data_source == "auto" and local is not None and local.is_file())
        if use_local:
            if local is None:
                raise BildexpError(f"task {cfg.name} has no local file: pass task.data_file=PATH")
            data = local_data(local, cfg.local_file, cfg.local_split or "unknown", cfg.drop_empty)
        elif cfg.hub_dataset is None:
            raise BildexpError(f"task {cfg.name} has neither a local file nor a hub dataset: pass task.data_file=PATH")
        else:
            data = _hub_data(cfg, cfg.split)
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
