"""Typed config schemas: the single place where defaults live.

Hydra composes conf/*.yaml on top of these dataclasses (registered in the ConfigStore), which rejects
unknown keys and wrong types. After `cli.py` converts the DictConfig with `to_config`, nothing else in
the package sees Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from bildexp import PROJECT_ROOT, BildexpError


@dataclass
class TaskConfig:
    name: str = "toy"
    # HF hub dataset for users with network access, by its namespaced id (REFERENCE.md names them).
    hub_dataset: Optional[str] = None
    hub_config: Optional[str] = None
    # The repository revision and the parquet files of one split in it ({config}: hub_config or "default";
    # {split}: a split name). Datasets >= 4 runs no loading scripts, so script-only repositories are read from
    # the hub's parquet export (revision refs/convert/parquet, files {config}/{split}/*.parquet).
    hub_revision: str = "refs/convert/parquet"
    hub_files: str = "{config}/{split}/*.parquet"
    # Rows the full evaluation split has on the hub (the paper's count); a different count is reported.
    hub_rows: Optional[int] = None
    # Split read from the hub; the official BiLD code evaluates on validation.
    split: str = "validation"
    # Field names in the hub rows: a dotted path ("translation.de", "answers.text.0": list items by index),
    # or, for the source, a template of such paths ("{context}\nQuestion: {question}").
    source_field: str = "source"
    target_field: str = "reference"
    # Drop hub rows whose source or reference is empty (XSUM's validation split has such documents; the
    # pipeline behind the paper's summarisation numbers drops them), counted in the run's `data` column.
    drop_empty: bool = False
    # File under data_dir holding this task as {"id", "source", "reference"} JSONL, and its split name.
    local_file: Optional[str] = None
    local_split: Optional[str] = None
    # Where local_file is looked up: $BILDEXP_DATA, else ../shared/data beside the repository.
    data_dir: Optional[str] = None
    # auto: local file when it exists, else the hub; local / hub force one; builtin: generated toy data.
    data_source: str = "auto"
    # Any local JSONL of {"id", "source", "reference"} rows; overrides everything above.
    data_file: Optional[str] = None
    # Training data for `bildexp train` / `bildexp align`: a file under data_dir, else this hub split.
    train_file: Optional[str] = None
    train_split: str = "train"
    # Encoder-decoder input: prefix + source ("summarize: " for T5 summarisation).
    prefix: str = ""
    # Decoder-only input when the tokenizer has no chat template; {source} is replaced.
    prompt_template: str = "{source}\n"
    # Decoder-only input when the tokenizer has a chat template: the user turn is instruction + source.
    instruction: str = ""
    # Source tokens kept (longer sources are truncated, counted and reported).
    max_source_tokens: int = 512
    max_new_tokens: int = 128
    # Headline metric of the task (a name registered in bildexp.metrics).
    metric: str = "bleu"
    # Which scoring becomes headline_score: standard (the field's: references as given, ROUGE with stemming) or
    # paper (the pipeline behind the paper's numbers: references round-tripped through the tokenizer at
    # reference_tokens, ROUGE without stemming on NLTK sentences). Every row carries both (bildexp/metrics.py).
    scoring: str = "standard"
    reference_tokens: int = 128


@dataclass
class EarlyExitConfig:
    # BiLD's early-exit variant (paper Section 4.4): the small model is the first N decoder layers of
    # the large model, with its final norm and LM head; null: two separate models.
    small_layers: Optional[int] = None


@dataclass
class PairConfig:
    name: str = "tiny_t5"
    # Hub id, local folder, or "builtin:<tiny pair>/<large|small>" for the project-built tiny pairs.
    large: str = "builtin:tiny_t5/large"
    small: str = "builtin:tiny_t5/small"
    # Tokenizer id or folder; defaults to the large model's own.
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    # cpu, cuda, or auto (cuda when available).
    device: str = "cpu"
    # torch intra-op threads; 1 is fastest for batch-1 decoding on these CPUs (ENVIRONMENT.md).
    threads: int = 1
    # For pairs whose weights are built locally: the command that builds them (named when they are missing).
    build: Optional[str] = None
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    # KV cache: dynamic (transformers' DynamicCache, eager) or static (preallocated per model for the run's
    # longest example, rollback = moving a write position; bildexp/cache.py). T5/MT5 and Llama/Qwen2 models.
    cache: str = "dynamic"
    # torch.compile mode of the static path's forward passes: none (eager), default (inductor), or
    # reduce-overhead (CUDA graphs on GPU), max-autotune, max-autotune-no-cudagraphs. Compilation happens
    # before timing and is reported apart (compile_s). Needs pair.cache=static.
    compile: str = "none"
    # Inductor freezing under pair.compile: weights become constants of the compiled graphs, so CPU linears run on
    # prepacked weights (and max-autotune's CPU GEMM templates, fast for few-token passes, apply at all).
    freeze: bool = False
    # Cut both models' vocabulary rows to the tokenizer's length, as the official BiLD code does for the kssteven
    # checkpoints (mT5 250,112 -> 250,100, T5 32,128 -> 32,100): the softmaxes the fallback and rollback rules
    # read then cover real tokens only. On for the kssteven pairs.
    resize_to_tokenizer: bool = False
    # Weight-only quantization of each model after loading (bildexp/quant.py): none, int8 (per output channel) or
    # int4 (groups of quant_group_size inputs, asymmetric), through torch's weight-only kernels; every Linear layer,
    # the LM head included. A quantized draft only changes what the small model proposes: the lossless policies
    # stay exact against the large model.
    small_quant: str = "none"
    large_quant: str = "none"
    quant_group_size: int = 128
    # int4: the LM head's own group size (the other layers take quant_group_size); null: the same as theirs. The
    # decoder layers' rounding costs a draft its agreement, the head's barely, and the head is the largest layer of a
    # small model with a large vocabulary: layers in 64 with the head in 128 keep bf16's agreement at the step cost
    # of groups of 128 (docs/testbeds.md "qwen25_int4").
    quant_head_group_size: Optional[int] = None
    # Passes of at least this many tokens (prompts, encoder inputs) run a quantized model's layers as dense GEMMs on
    # the dequantized weights, kept beside the codes: the weight-only kernels cost the same per token at any length,
    # so an int4 draft's prompt pass is slower than a dense one (bildexp/quant.py). 0: never (no dense copy).
    quant_dense_rows: int = 0


@dataclass
class PolicyConfig:
    name: str = "vanilla"
    # vanilla: which model decodes alone.
    which: str = "large"
    # Greedy unless sampling; sampling is nucleus sampling with top_p and temperature.
    sampling: bool = False
    top_p: float = 0.8
    temperature: float = 1.0
    seed: int = 0
    # bild: the small model's token is kept only while its max probability exceeds this.
    fallback_threshold: float = 0.5
    # bild: a small token whose cross-entropy under the large model exceeds this is rolled back.
    rollback_threshold: float = 2.0
    # bild: control returns to the large model after this many consecutive small tokens (paper: 10).
    max_small_steps: int = 10
    # oracle (BiLD Figure 2): the large model's token replaces the small model's whenever the large model
    # gives the small token a probability below this (0: never, 1: nearly always).
    replace_threshold: float = 0.5
    # speculative, hf_assisted: tokens the small model drafts before each verification (paper sweep 3-10).
    num_draft_tokens: int = 4
    # calm: confidence measure of an exit: softmax_max, softmax_diff (top-1 minus top-2) or state
    # (cosine of the hidden states after consecutive layers: saturation).
    confidence_measure: str = "state"
    # calm: a token exits at the first layer whose confidence exceeds lambda(t) =
    # clip(0.9 * exit_threshold + 0.1 * exp(-exit_decay * t / max_new_tokens)); CALM's lambda and tau.
    exit_threshold: float = 0.9
    exit_decay: float = 0.0
    # ppd_match: the 1-based decoder layers whose early prediction is checked (empty: every layer but the
    # last), and the top-k sizes (PPD Table 1: does the top-k at layer l contain the final top-1?).
    match_layers: list[int] = field(default_factory=list)
    match_top_k: list[int] = field(default_factory=lambda: [1, 3, 5])
    # ppd_match: a folder with trained per-layer heads (`bildexp train ... train.exit_heads=[...]`); null:
    # every layer reads through the model's own final norm and LM head (the paper's "trained: N").
    match_heads: Optional[str] = None
    # ppd: the early-prediction layer d̄ (1-based, d/2 <= d̄ < d; null = d/2 rounded up), the number of
    # candidates k started from its top-k, and whether they run in a second thread concurrently with the
    # current token's remaining layers (the paper's extra compute units; false = one after the other).
    ppd_layer: Optional[int] = None
    ppd_top_k: int = 3
    ppd_parallel: bool = True


@dataclass
class RunnerConfig:
    output_dir: str = "results"
    # First N examples of the split; null for all.
    limit: Optional[int] = None
    # Examples decoded once before timing starts and not recorded.
    warmup: int = 2
    # Re-run a run that is already complete.
    force: bool = False
    # A further measurement of the same setting as its own run (run id and CSV row of its own, nothing else
    # changed): e.g. vanilla large timed again after the policies it is the baseline of, in the same sitting.
    repeat: int = 0
    # With -m: decode every point of the sweep in this one process, example by example in rotating order, so that drift
    # in the machine's speed hits every point alike (bildexp/runner.py, run_interleaved); each point keeps its own run
    # folder and row (same tokens and scores as run alone), and rows timed together share `interleave_group`. Not in
    # the run id. Needs all points in one process: a launcher that spreads them over processes is refused.
    interleave: bool = False
    progress: bool = True


@dataclass
class ReproduceConfig:
    """How `bildexp reproduce experiment=<artifact>/<variant>` runs an experiment (conf/experiment/*/)."""

    # Commands run first, each as `bildexp <command>` (train heads, build a testbed); resumable themselves.
    prepare: list[str] = field(default_factory=list)
    # One Hydra multirun per entry (`bildexp run -m`): overrides after experiment=<this artifact>, with A,B
    # sweeps; an entry that starts with experiment=OTHER runs that experiment into this one's output_dir.
    sweeps: list[str] = field(default_factory=list)
    # Run every point of every sweep above as ONE interleaved group in this process (bildexp/runner.py,
    # run_interleaved): example by example in rotating order, so each speedup divides by a vanilla-large row timed
    # alongside it. All sweeps must share the task and runner.limit; no Hydra launcher.
    interleave: bool = False
    # `--tiny`: these overrides replace the same keys in every sweep (tiny pairs, a few examples, short
    # outputs), and each swept value axis keeps only its first and last values (every group choice stays):
    # a check that the config runs.
    tiny: list[str] = field(
        default_factory=lambda: ["pair=tiny_t5", "runner.limit=2", "runner.warmup=0", "task.max_new_tokens=8"]
    )
    # The rehearsal of the networked route (tests/test_hub_route.py, on a stand-in HF hub cache): the pairs and
    # hub data stay the paper's; these overrides replace the same keys in every sweep (swept value axes cut to
    # their first value), and `rehearse_prepare` shrinks every prepare command (a `bildexp train`).
    rehearse: list[str] = field(default_factory=lambda: ["runner.limit=1", "runner.warmup=0", "task.max_new_tokens=6"])
    rehearse_prepare: list[str] = field(default_factory=lambda: [
        "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2",
        "train.eval_examples=2", "train.eval_decode=2"])


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    # Results go to results/<experiment_name>.csv and results/runs/<experiment_name>/.
    experiment_name: str = "default"


# The PolicyConfig fields each policy reads; the others are left out of its run id and CSV row, so a
# vanilla row never shows BiLD's thresholds. Sampling knobs count only when sampling is on.
POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "vanilla": ("which",),
    "bild": ("fallback_threshold", "rollback_threshold", "max_small_steps"),
    "oracle": ("replace_threshold",),
    "speculative": ("num_draft_tokens",),
    "hf_assisted": ("num_draft_tokens",),
    "calm": ("confidence_measure", "exit_threshold", "exit_decay"),
    "ppd_match": ("match_layers", "match_top_k", "match_heads"),
    "ppd": ("ppd_layer", "ppd_top_k", "ppd_parallel"),
}
SAMPLING_FIELDS = ("top_p", "temperature", "seed")
# The policies built on `cache.ModelState` alone, which run on static caches and compiled steps; the
# layer-wise ones (calm, ppd, ppd_match, BiLD early exit) and transformers' hf_assisted stay eager.
STATIC_POLICIES = ("vanilla", "bild", "oracle", "speculative")
# pair.compile: none, or a torch.compile mode.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# pair.small_quant, pair.large_quant (bildexp/quant.py).
QUANT_MODES = ("none", "int8", "int4")


def policy_fields(p: PolicyConfig) -> dict[str, Any]:
    """name, sampling, and the knobs this policy uses, under their config names."""
    keys = ("name", "sampling", *POLICY_FIELDS[p.name], *(SAMPLING_FIELDS if p.sampling else ()))
    return {k: getattr(p, k) for k in keys}


@dataclass
class TrainConfig:
    """One training recipe (conf/train/*.yaml): fine-tune a model, or train one from scratch."""

    name: str = "tiny_t5_toy"
    # Start from this model (hub id, folder or builtin:...); null trains `arch` from scratch.
    init: Optional[str] = None
    # Keep only the first N decoder layers of init (a cheap draft sharing embeddings and head); null: all.
    init_layers: Optional[int] = None
    # Early-exit training: none (the last layer's loss), bild (BiLD Section 4.4: 1/2 (L_exit_layer + L_last))
    # or calm (CALM: sum_i w_i L_i over every decoder layer, w_i = i / sum_j j). Exits read the hidden state
    # after a layer through the final norm and the shared LM head.
    exit_loss: str = "none"
    # bild: the 1-based decoder layer whose exit is trained (pair.early_exit.small_layers at decode time).
    exit_layer: int = 1
    # PPD's per-layer heads: with layers listed, the model is frozen and one head per layer (a copy of the
    # final norm and LM head) is trained on the hidden state after it; saved as final/exit_heads.*.
    exit_heads: list[int] = field(default_factory=list)
    # From scratch: the transformers config class's arguments, plus `type` (t5 or llama).
    arch: dict[str, Any] = field(default_factory=dict)
    # Tokenizer (id or folder); null takes init's. From scratch with null, a SentencePiece model of
    # `vocab_size` is trained on the training split's sources and references.
    tokenizer: Optional[str] = None
    vocab_size: int = 8000
    # JSONL of {id, source, reference} to train on instead of the task's training split (alignment).
    data_file: Optional[str] = None
    # Checkpoints, logs and the final model go here; a run that finds a checkpoint resumes from it.
    output_dir: str = "checkpoints/${train.name}"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_target_tokens: int = 128
    # Validation every eval_every steps: loss on eval_examples, the task metric on eval_decode ones.
    eval_every: int = 200
    eval_examples: int = 200
    eval_decode: int = 100
    save_every: int = 200
    device: str = "auto"
    threads: int = 1
    progress: bool = True


@dataclass
class TrainRunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Unused by training: present because paper tasks name their default pair (conf/task/*.yaml).
    pair: PairConfig = field(default_factory=PairConfig)


@dataclass
class AlignConfig:
    # Calibration inputs: the first N of the task's TRAINING split (evaluation examples are excluded).
    calibration_examples: int = 1000
    # ...or of this JSONL's sources instead (its references are ignored), for tasks with no training
    # split offline (XSUM: e.g. CNN/DM articles). Evaluation examples are excluded all the same.
    calibration_file: Optional[str] = None
    # Top-1 agreement is measured on the first N evaluation examples, along the large model's outputs.
    agreement_examples: int = 100
    # calibration.jsonl, report.json and the aligned small model (small/final) go here.
    output_dir: str = "checkpoints/${pair.name}_aligned"
    progress: bool = True


@dataclass
class AlignRunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


def register_configs() -> None:
    # One schema for the whole config: it types every section, so the groups need none of their own.
    ConfigStore.instance().store(name="config_schema", node=Config)
    ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)
    ConfigStore.instance().store(name="align_schema", node=AlignRunConfig)


_CHOICES = {
    "policy.name": tuple(POLICY_FIELDS),
    "policy.which": ("large", "small"),
    "policy.confidence_measure": ("softmax_max", "softmax_diff", "state"),
    "pair.dtype": ("float32", "bfloat16", "float16"),
    "pair.device": ("cpu", "cuda", "auto"),
    "pair.cache": ("dynamic", "static"),
    "pair.compile": COMPILE_MODES,
    "pair.small_quant": QUANT_MODES,
    "pair.large_quant": QUANT_MODES,
    "task.data_source": ("auto", "local", "hub", "builtin"),
    "task.scoring": ("standard", "paper"),
}


def validate(cfg: Config) -> Config:
    """One-line errors for values the schema's types cannot catch."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise BildexpError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    p = cfg.policy
    if not 0.0 <= p.fallback_threshold <= 1.0:
        raise BildexpError(f"policy.fallback_threshold={p.fallback_threshold} is out of range: use a probability in [0, 1]")
    if p.rollback_threshold < 0.0:
        raise BildexpError(f"policy.rollback_threshold={p.rollback_threshold} is out of range: use a cross-entropy >= 0")
    if not 0.0 <= p.replace_threshold <= 1.0:
        raise BildexpError(f"policy.replace_threshold={p.replace_threshold} is out of range: use a probability in [0, 1]")
    if p.max_small_steps < 1:
        raise BildexpError(f"policy.max_small_steps={p.max_small_steps} must be >= 1")
    if p.num_draft_tokens < 1:
        raise BildexpError(f"policy.num_draft_tokens={p.num_draft_tokens} must be >= 1")
    if not 0.0 <= p.exit_threshold <= 1.0:
        raise BildexpError(f"policy.exit_threshold={p.exit_threshold} is out of range: use a value in [0, 1]")
    if any(k < 1 for k in p.match_top_k) or any(layer < 1 for layer in p.match_layers) or not p.match_top_k:
        raise BildexpError(f"policy.match_layers={p.match_layers} / match_top_k={p.match_top_k}: use layers >= 1 and top-k sizes >= 1")
    if p.ppd_top_k < 1 or (p.ppd_layer is not None and p.ppd_layer < 1):
        raise BildexpError(f"policy.ppd_top_k={p.ppd_top_k} / ppd_layer={p.ppd_layer}: use k >= 1 and a layer >= 1")
    if p.name == "ppd" and p.sampling:
        raise BildexpError("policy=ppd is exact greedy decoding: set policy.sampling=false")
    if p.exit_decay < 0.0:
        raise BildexpError(f"policy.exit_decay={p.exit_decay} must be >= 0")
    ee = cfg.pair.early_exit.small_layers
    if ee is not None and ee < 1:
        raise BildexpError(f"pair.early_exit.small_layers={ee} must be >= 1 (or null for two separate models)")
    if cfg.pair.freeze and cfg.pair.compile == "none":
        raise BildexpError("pair.freeze=true freezes compiled graphs: add pair.compile=default (or another mode) and pair.cache=static")
    if cfg.pair.compile != "none" and cfg.pair.cache != "static":
        raise BildexpError(f"pair.compile={cfg.pair.compile} compiles the static-cache path: add pair.cache=static")
    if cfg.pair.cache == "static":
        if p.name not in STATIC_POLICIES:
            raise BildexpError(f"policy={p.name} runs eager on dynamic caches only: use pair.cache=dynamic pair.compile=none "
                               f"(static caches serve {', '.join(STATIC_POLICIES)})")
        if ee is not None:
            raise BildexpError(f"pair {cfg.pair.name} is an early-exit pair (layer-wise, eager): use pair.cache=dynamic pair.compile=none")
    if ee is not None and cfg.pair.small_quant != "none":
        raise BildexpError(f"pair {cfg.pair.name} is an early-exit pair: its small model is the large model's first layers, "
                           "quantized with pair.large_quant; set pair.small_quant=none")
    if not 0.0 < p.top_p <= 1.0:
        raise BildexpError(f"policy.top_p={p.top_p} is out of range: use a value in (0, 1]")
    if p.temperature <= 0.0:
        raise BildexpError(f"policy.temperature={p.temperature} must be > 0")
    if cfg.task.max_new_tokens < 1 or cfg.task.max_source_tokens < 1:
        raise BildexpError("task.max_new_tokens and task.max_source_tokens must be >= 1")
    if cfg.runner.warmup < 0:
        raise BildexpError(f"runner.warmup={cfg.runner.warmup} must be >= 0 (untimed examples before timing)")
    if cfg.runner.limit is not None and cfg.runner.limit < 1:
        raise BildexpError(f"runner.limit={cfg.runner.limit} must be >= 1 (or null for all examples)")
    if cfg.runner.repeat < 0:
        raise BildexpError(f"runner.repeat={cfg.runner.repeat} must be >= 0 (0: the first measurement)")
    if cfg.pair.threads < 1:
        raise BildexpError(f"pair.threads={cfg.pair.threads} must be >= 1")
    return cfg


def to_train_config(dcfg: DictConfig, schema: type = TrainRunConfig) -> Any:
    """DictConfig → TrainRunConfig (or AlignRunConfig), with the training recipe checked."""
    obj: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dcfg))
    t = obj.train
    if t.init is None and not t.arch:
        raise BildexpError(f"train recipe {t.name}: set train.init (a model to fine-tune) or train.arch (from scratch)")
    if t.arch and t.arch.get("type") not in ("t5", "llama"):
        raise BildexpError(f"train.arch.type={t.arch.get('type')!r}: use t5 or llama")
    for key in ("steps", "batch_size", "eval_every", "save_every"):
        if getattr(t, key) < 1:
            raise BildexpError(f"train.{key}={getattr(t, key)} must be >= 1")
    if t.lr <= 0:
        raise BildexpError(f"train.lr={t.lr} must be > 0")
    if t.exit_loss not in ("none", "bild", "calm"):
        raise BildexpError(f"train.exit_loss={t.exit_loss!r}: use none, bild or calm")
    if t.exit_layer < 1:
        raise BildexpError(f"train.exit_layer={t.exit_layer} must be >= 1")
    return obj


def to_config(dcfg: DictConfig | Config) -> Config:
    """DictConfig from Hydra (already schema-checked) → plain, validated dataclasses."""
    if isinstance(dcfg, Config):
        return validate(dcfg)
    obj: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), dcfg))
    return validate(obj)


CONF_DIR = PROJECT_ROOT / "conf"


def compose_config(*overrides: str) -> Config:
    """The real conf/ composed with overrides, as `bildexp run` composes it → a validated `Config`
    (for scripts and tests that need a run's settings without running it)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def compose_train_config(*overrides: str) -> TrainRunConfig:
    """conf/train.yaml composed with overrides, as `bildexp train` composes it → a checked `TrainRunConfig`."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


def compose_point(overrides: list[str]):
    """compose_config, with Hydra's and OmegaConf's errors (an unknown key, a wrong type) as one BildexpError line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(*overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise BildexpError(override_error(err)) from None


def override_error(err: Exception) -> str:
    """Hydra's composition error → one line: the unknown key and the keys its section has, or the error's gist."""
    text = f"{err}\n{err.__cause__ or ''}"
    unknown = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    full_key = re.search(r"full_key: ([\w.]+)", text)
    schema = globals().get(unknown.group(2)) if unknown else None
    if unknown and dataclasses.is_dataclass(schema):
        key = full_key.group(1) if full_key else unknown.group(1)
        section = key.rsplit(".", 1)[0] if "." in key else "the config"
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        return f"unknown key {key}: {section} has {known}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(("full_key", "object_type", "reference_type"))]
    return "; ".join(lines[:2])
