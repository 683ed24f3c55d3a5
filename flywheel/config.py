"""Typed configuration: one validated dataclass per stage, gathered in `FlywheelConfig`."""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from flywheel.errors import UserError
from flywheel.pairing import STRATEGIES
from judges.loading import BUILT_IN, HUMAN


# The preference losses `flywheel.dpo.dpo_loss` computes (defined here to keep torch out of
# importing a config).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LR_SCHEDULES = ("constant", "linear", "cosine")
# Which model a round samples its training pairs from: the current (promoted) policy,
# online or (with refresh_every above 1) semi-online DPO, or always the initial model,
# which is offline DPO fed in chunks.
SAMPLE_SOURCES = ("current", "initial")
REFERENCES = ("initial", "previous")
# The dtypes vLLM's engine takes (`vllm.config.model._STR_DTYPE_TO_TORCH_DTYPE`, and auto:
# the checkpoint's own).
ENGINE_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# The trainer's precision: auto is bfloat16 on CUDA, float32 elsewhere.
TRAIN_DTYPES = ("auto", "bfloat16", "float32")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


@dataclass(frozen=True)
class SampleConfig:
    prompts_per_round: int = 512
    # Prompts per engine call, each call's completions stored in one transaction: a
    # crash mid-sampling loses at most this many prompts' work.
    batch_prompts: int = 256
    source: str = "current"
    # With source current: rounds 1, 1 + k, 1 + 2k, ... sample from the policy they begin
    # with, and the rounds between reuse it (1: online; k > 1: semi-online). Training goes
    # on every round. `flywheel.rounds.sampling_policy` has the rule.
    refresh_every: int = 1
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 8
    max_model_len: int = 64
    dtype: str = "auto"
    # On CPU, vLLM sizes its KV cache from RAM by this fraction; 0.3 is what works here.
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False
    # Put the engine to sleep (vLLM sleep mode, level 1: weights to host memory, KV cache
    # freed) while the trainer uses the GPU, and reload the checkpoint on waking. Where
    # vLLM has no sleep mode (its CPU build) the engine keeps its memory, and the round
    # records that it could not sleep.
    sleep_mode: bool = True
    # GPUs one engine shards the policy across (vLLM tensor parallelism), for a policy
    # that does not fit one GPU.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.prompts_per_round >= 1, f"sample.prompts_per_round must be >= 1, got {self.prompts_per_round}")
        _require(self.source in SAMPLE_SOURCES, f"sample.source must be one of {SAMPLE_SOURCES}, got {self.source!r}")
        _require(self.refresh_every >= 1, f"sample.refresh_every must be >= 1, got {self.refresh_every}")
        _require(self.refresh_every == 1 or self.source == "current",
                 "sample.refresh_every applies to sample.source current only (initial never refreshes)")
        _require(self.batch_prompts >= 1, f"sample.batch_prompts must be >= 1, got {self.batch_prompts}")
        _require(self.n >= 2, f"sample.n must be >= 2 to form pairs, got {self.n}")
        _require(self.temperature > 0, f"sample.temperature must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"sample.top_p must be in (0, 1], got {self.top_p}")
        _require(self.max_tokens >= 1, f"sample.max_tokens must be >= 1, got {self.max_tokens}")
        _require(self.max_tokens < self.max_model_len,
                 f"sample.max_tokens ({self.max_tokens}) must be less than sample.max_model_len "
                 f"({self.max_model_len}): the context holds the prompt and the completion")
        _require(isinstance(self.dtype, str) and self.dtype.lower() in ENGINE_DTYPES,
                 f"sample.dtype must be one of {ENGINE_DTYPES}, got {self.dtype!r}")
        _require(0 < self.gpu_memory_utilization <= 1,
                 f"sample.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.tensor_parallel_size >= 1,
                 f"sample.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


# What pairing does with a completion cut at sample.max_tokens (finish_reason 'length').
TRUNCATED_HANDLING = ("keep", "lose", "drop")


@dataclass(frozen=True)
class PromptSource:
    """Where prompts come from: a file (`path`: .jsonl, .json, .csv or .parquet), or any
    source `datasets` loads (`dataset`: a local directory of parquet, json or arrow files,
    a `save_to_disk` directory, a builder such as `parquet` with `data_files`, or a hub
    name where the machine has network), reading `split` and the prompts' `column`.
    A prompt is a string or a conversation: a list of {role, content} messages."""

    path: Path | None = None
    dataset: str | None = None
    split: str = "train"
    column: str = "prompt"
    data_files: Path | None = None

    def __post_init__(self) -> None:
        _require((self.path is None) != (self.dataset is None),
                 "prompts need exactly one of path (a file) and dataset (a datasets source)")
        _require(self.data_files is None or self.dataset is not None, "prompts.data_files goes with prompts.dataset")
        _require(bool(self.column), "prompts.column must not be empty")
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path).expanduser().resolve())

    def resolved(self, base: Path) -> PromptSource:
        """With a `dataset` that names a directory or file under `base` made absolute (a
        name that is not there stays a name, for the hub)."""
        if self.dataset is None or not (base / self.dataset).expanduser().exists():
            return self
        return replace(self, dataset=str((base / self.dataset).expanduser().resolve()))

    def __str__(self) -> str:
        """How messages and `skipped_prompts.source` name the source."""
        if self.path is not None:
            return str(self.path)
        files = f", data_files {self.data_files}" if self.data_files is not None else ""
        return f"dataset {self.dataset} (split {self.split}{files})"


@dataclass(frozen=True)
class PairConfig:
    strategy: str = "random"
    # The round's label budget: when more pairs form, a seeded random subset of this many
    # is kept (and labelled). None keeps every pair.
    max_pairs_per_round: int | None = None
    # A completion cut at max_tokens is not an answer, and judges are swayed by length
    # (reward models prefer longer text: Singhal et al. 2023, "A Long Way to Go"), so by
    # default it is never paired. `lose`: it loses to a finished completion without asking
    # the judge (two cut ones go to the judge); `keep`: it is paired like any other.
    truncated: str = "drop"

    def __post_init__(self) -> None:
        _require(self.strategy in STRATEGIES, f"pair.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _require(self.truncated in TRUNCATED_HANDLING,
                 f"pair.truncated must be one of {TRUNCATED_HANDLING}, got {self.truncated!r}")
        _require(self.max_pairs_per_round is None or self.max_pairs_per_round >= 1,
                 f"pair.max_pairs_per_round must be >= 1 (or left out: every pair), got {self.max_pairs_per_round}")


@dataclass(frozen=True)
class JudgeConfig:
    """Who labels the pairs: a spec (see `judges.loading`) and keyword options for it.

    `human` (people, through the labelling queue), `rule:package.module:function`,
    `reward-model:PATH`, `llm:PATH`, or your own judge as `package.module:Name`. Pairs are judged `batch_size` at a time, each batch stored in
    one transaction, so a crash loses at most the batch in flight.
    """

    spec: str
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256

    def __post_init__(self) -> None:
        kind, _, rest = self.spec.partition(":")
        _require(self.spec == HUMAN or (bool(kind) and bool(rest)),
                 f"judge.spec must be {HUMAN!r}, one of {', '.join(k + ':...' for k in BUILT_IN)} or "
                 f"'package.module:Name', got {self.spec!r}")
        _require(isinstance(self.options, dict), f"judge.options must be a mapping, got {type(self.options).__name__}")
        _require(self.batch_size >= 1, f"judge.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.1
    learning_rate: float = 3e-5
    batch_size: int = 32
    epochs: int = 1
    # Exactly this many optimiser steps of `batch_size` a round instead of `epochs` passes
    # (`flywheel.training.batch_schedule`): the same training whatever the number of preferences.
    steps_per_round: int | None = None
    max_grad_norm: float = 1.0
    # Weight of the chosen completions' per-token NLL added to the DPO loss (Pang et al.
    # 2024, Iterative Reasoning Preference Optimization, eq. 1). 0 is pure DPO. Without it,
    # DPO on the demo lowers the likelihood of right answers too and accuracy falls.
    nll_weight: float = 0.0
    # The preference loss (`flywheel.dpo.dpo_loss`): sigmoid (DPO), ipo, hinge or robust.
    loss_type: str = "sigmoid"
    # The assumed share of flipped labels: conservative DPO for sigmoid, robust DPO for robust.
    label_smoothing: float = 0.0
    # Mean instead of summed completion log-probs, so length alone cannot move the loss.
    length_normalised: bool = False
    # `batch_size` pairs per optimiser step, run as this many equal micro-batches.
    gradient_accumulation_steps: int = 1
    # Linear warm-up over the first `warmup_steps` optimiser steps, then constant, linear
    # or cosine decay to the last step (`flywheel.training.learning_rate_at`).
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    # The frozen model DPO measures against: the initial (SFT) model every round, or the
    # previous round's promoted checkpoint (the policy the round begins with).
    reference: str = "initial"
    # Share of the training set replayed from earlier rounds' preferences (0: only this
    # round's fresh, on-policy pairs). Replayed pairs are off-policy but guard against forgetting.
    replay_fraction: float = 0.0
    # LoRA (through peft) on every linear layer when > 0: only the adapters train, and they
    # are merged into the weights on save, so the checkpoint loads in vLLM as it is.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # Data-parallel processes under `accelerate launch` (one per GPU on a GPU host);
    # 1 trains in the flywheel's own process.
    num_processes: int = 1
    # The precision of the weights that do not train (a LoRA policy's base, the models of
    # the reference and KL log-prob passes) and of the forward passes (autocast); auto is
    # bfloat16 on CUDA and float32 on CPU. The weights that train, and their AdamW
    # states, stay float32 (`flywheel.training.setup_training` says why).
    dtype: str = "auto"
    # Gradient checkpointing (recompute activations in backward): memory for time.
    gradient_checkpointing: bool = False
    # Keep the frozen reference model loaded between rounds (on the trainer's device,
    # where its log-prob passes run) instead of loading it twice a round, for its
    # log-probs in training and at evaluation: faster, but it holds that memory while
    # sampling and training run.
    keep_reference_loaded: bool = False

    def __post_init__(self) -> None:
        _require(self.nll_weight >= 0, f"train.nll_weight must be >= 0, got {self.nll_weight}")
        _require(self.loss_type in LOSS_TYPES, f"train.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        _require(0 <= self.label_smoothing < 0.5, f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.gradient_accumulation_steps >= 1,
                 f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        _require(self.batch_size % self.gradient_accumulation_steps == 0,
                 f"train.batch_size ({self.batch_size}) must be a multiple of gradient_accumulation_steps "
                 f"({self.gradient_accumulation_steps})")
        _require(self.num_processes >= 1, f"train.num_processes must be >= 1, got {self.num_processes}")
        _require(self.dtype in TRAIN_DTYPES, f"train.dtype must be one of {TRAIN_DTYPES}, got {self.dtype!r}")
        _require(self.lora_rank >= 0, f"train.lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        _require(self.lora_alpha > 0, f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0 <= self.replay_fraction < 1, f"train.replay_fraction must be in [0, 1), got {self.replay_fraction}")
        _require(self.reference in REFERENCES, f"train.reference must be one of {REFERENCES}, got {self.reference!r}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _require(self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
                 f"train.label_smoothing applies to the sigmoid and robust losses, not {self.loss_type!r}")
        _require(self.beta > 0, f"train.beta must be > 0, got {self.beta}")
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _require(self.steps_per_round is None or self.steps_per_round >= 1,
                 f"train.steps_per_round must be >= 1 (or left out: train.epochs passes), got {self.steps_per_round}")
        _require(self.steps_per_round is None or self.epochs == 1,
                 "set train.epochs or train.steps_per_round, not both")
        _require(self.max_grad_norm > 0, f"train.max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class EvalConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    # The candidate must beat the incumbent by more than this (accuracy, or win rate - 0.5).
    promotion_margin: float = 0.0
    # A verifier `package.module:function`, score(prompt, completion) -> float, whose mean
    # over held-out samples is the accuracy the promotion gate uses; without one, the
    # gate uses the judge's win rate against the incumbent.
    accuracy_score: str | None = None
    # Who judges candidate against incumbent for the win rate; default: the round's judge.
    # People cannot answer while a round evaluates, so with a `human` judge this defaults
    # to a rule judge made from `accuracy_score`, and one of the two must be set.
    judge: JudgeConfig | None = None

    def __post_init__(self) -> None:
        _require(self.judge is None or self.judge.spec != HUMAN,
                 "eval.judge cannot be 'human': people cannot judge while a round evaluates")
        _require(self.samples_per_prompt >= 1, f"eval.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        _require(self.temperature > 0, f"eval.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class FlywheelConfig:
    """Everything one flywheel needs. Paths are resolved when the config is made."""

    workdir: Path
    reference_model: Path
    prompts: PromptSource
    heldout_prompts: PromptSource
    judge: JudgeConfig
    seed: int = 0
    sample: SampleConfig = field(default_factory=SampleConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("workdir", "reference_model"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
        for name in PROMPT_KEYS:  # a plain path is a prompts file
            if not isinstance(getattr(self, name), PromptSource):
                object.__setattr__(self, name, PromptSource(path=getattr(self, name)))

    @property
    def database(self) -> Path:
        return self.workdir / "flywheel.duckdb"

    @property
    def checkpoints_dir(self) -> Path:
        return self.workdir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (paths as strings)."""
        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            return str(value) if isinstance(value, Path) else value
        return plain(asdict(self))


# -- config files -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFile:
    """What one `flywheel run` runs: the flywheel's config, and how many rounds (the
    file's top-level `rounds`, which `--rounds` or `rounds=N` overrides)."""

    config: FlywheelConfig
    rounds: int = 1

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")


# Keys of the top level that are not FlywheelConfig fields.
RUN_FILE_KEYS = ("rounds",)
# The FlywheelConfig fields that are paths, and those that are prompt sources.
PATH_KEYS = ("workdir", "reference_model")
PROMPT_KEYS = ("prompts", "heldout_prompts")
# Sections that a single value may stand for: `judge: SPEC` is `judge: {spec: SPEC}`, and
# `prompts: FILE` is `prompts: {path: FILE}`.
SHORTHAND_KEYS = {JudgeConfig: "spec", PromptSource: "path"}


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys and reads `3e-5` as a number (as YAML 1.2
    does; PyYAML's YAML 1.1 reads it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_config_file(path: Path) -> RunFile:
    """Read a YAML config file into a validated `RunFile`. Relative paths in it are taken
    from the file's directory. Every mistake is a one-line UserError naming the file and
    the key (`flywheel.yaml: unknown key 'train.betta' (train takes: beta, ...)`)."""
    return load_run_config(path)


def load_run_config(path: Path | None = None, settings: Sequence[tuple[str, Any]] = (),
                    overrides: Sequence[str] = ()) -> RunFile:
    """A run's config: the YAML file at `path` (if any), then each of `settings` (`(key,
    value)` pairs) and `overrides` (`"key=value"` strings, the value read as YAML) set at
    its dotted key (`train.beta`, `judge.options.name`), in order, then validated once.

    Relative paths in the file are taken from its directory, those set here from the
    current directory. Every mistake is one line naming the key: an override's own
    mistakes (an unknown key, a value the config refuses) start `override KEY=VALUE: `,
    the file's start with the file's path.
    """
    given = _given(settings, overrides)
    if path is None:
        return _run_config({}, Path("."), "", given)
    path = Path(path).expanduser()
    return _run_config(_read_config_data(path, empty_ok=bool(given)), path.parent, f"{path}: ", given)


def override_run_file(run_file: RunFile, settings: Sequence[tuple[str, Any]] = (),
                      overrides: Sequence[str] = ()) -> RunFile:
    """`run_file` with `settings` and `overrides` set as `load_run_config` sets them, validated again."""
    given = _given(settings, overrides)
    if not given:
        return run_file
    return _run_config({**config_mapping(run_file.config), "rounds": run_file.rounds}, Path("."), "", given)


def _given(settings: Sequence[tuple[str, Any]], overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    return [*((key, value, f"{key}={value}") for key, value in settings), *map(parse_override, overrides)]


def _run_config(data: dict[str, Any], base: Path, source: str, given: Sequence[tuple[str, Any, str]]) -> RunFile:
    for key, value, shown in given:
        try:
            _set_key(data, key, value)
        except UserError as error:
            raise UserError(f"override {shown}: {error}") from None
    try:
        rounds = _convert(data.pop("rounds"), int, "rounds", base) if "rounds" in data else None
        config = config_from_mapping(FlywheelConfig, data, base=base, extra_keys=RUN_FILE_KEYS)
        return RunFile(config) if rounds is None else RunFile(config, rounds)
    except UserError as error:
        message = str(error)
        # The last override of the key the message names is where the value came from.
        culprit = next((shown for key, _, shown in reversed(given)
                        if message.startswith((key + " ", key + "."))), None)
        raise UserError(f"override {culprit}: {message}" if culprit else f"{source}{message}") from None


def _read_config_data(path: Path, empty_ok: bool = False) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {getattr(error, 'strerror', None) or error}") from error
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: not valid YAML ({where}{problem})") from None
    if data is None and not empty_ok:
        raise UserError(f"{path}: the file is empty; it needs at least "
                        f"{', '.join(_required_keys(FlywheelConfig))}")
    if data is not None and not isinstance(data, Mapping):
        raise UserError(f"{path}: the top level must be a mapping of keys "
                        f"({', '.join([*_keys(FlywheelConfig), *RUN_FILE_KEYS])}), "
                        f"got {_shown(data)}")
    return dict(data or {})


_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*")


def parse_override(text: str) -> tuple[str, Any, str]:
    """`"train.beta=0.2"` -> `("train.beta", 0.2, text)`: the value is read as YAML
    (`true`, `3e-4`, `null`, `[a, b]`, `{name: x}`; anything else a string)."""
    key, sep, raw = text.partition("=")
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise UserError(f"{text!r} is not KEY=VALUE with a dotted key (e.g. train.beta=0.2)")
    return key, parse_value(raw), text


def parse_value(text: str) -> Any:
    """A command line's value: a YAML scalar (`true`, `3e-4`, `null`, `'quoted text'`), or
    a flow list or mapping (`[a, b]`, `{name: x}`); any other text is taken as it is."""
    stripped = text.strip()
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and stripped[:1] not in "[{":
        return text  # `Which: A or B?` is text, not a mapping
    if isinstance(value, str) and stripped[:1] not in "'\"":
        return text  # text as written, comments (` #`) and all
    return value


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` in the config mapping `data`, checking each part against the
    config classes. A mapping given for a section is merged into it, key by key."""
    cls: type | None = FlywheelConfig  # None: inside a free-form mapping (judge.options)
    node, where, parts = data, "", key.split(".")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if cls is None:
            hint: Any = Any
        else:
            keys = [*_keys(cls), *(RUN_FILE_KEYS if cls is FlywheelConfig else ())]
            if part not in keys:
                raise _unknown_key(_dotted(where, part), where, keys)
            hint = int if cls is FlywheelConfig and part in RUN_FILE_KEYS else _without_none(get_type_hints(cls)[part])
        where = _dotted(where, part)
        if last:
            if is_dataclass(hint) and isinstance(value, Mapping):
                for name, item in value.items():
                    _set_key(data, f"{key}.{name}", item)
                node.setdefault(part, {})
            else:
                if hint in (Path, PromptSource) and isinstance(value, (str, Path)) and str(value):
                    value = str(Path.cwd() / Path(value).expanduser())  # a prompts FILE too
                node[part] = value
            return
        child = node.get(part)
        if hint in SHORTHAND_KEYS and isinstance(child, str):
            child = {SHORTHAND_KEYS[hint]: child}
        if is_dataclass(hint):
            cls = hint
        elif not (hint is Any or hint is dict or get_origin(hint) is dict):
            raise UserError(f"{where} is a single value, so {key!r} is not a key")
        else:
            cls = None
        node[part] = child = dict(child) if isinstance(child, Mapping) else {}
        node = child


def check_override_keys(settings: Sequence[tuple[str, Any]] = (), overrides: Sequence[str] = ()) -> None:
    """Refuse an override whose key is not a config key (or is not KEY=VALUE), before
    anything is built; its value is checked with the rest of the config."""
    for key, value, shown in _given(settings, overrides):
        try:
            _set_key({}, key, value)
        except UserError as error:
            raise UserError(f"override {shown}: {error}") from None


def dotted_keys(cls: type | None = None, where: str = "") -> list[str]:
    """Every key a config file or an override can set (`train.beta`, ...); the free-form
    mappings (`judge.options`) as themselves."""
    cls = cls or FlywheelConfig
    keys = [] if where else list(RUN_FILE_KEYS)
    for name, hint in get_type_hints(cls).items():
        if name not in _keys(cls):
            continue
        hint = _without_none(hint)
        keys += dotted_keys(hint, _dotted(where, name)) if is_dataclass(hint) else [_dotted(where, name)]
    return keys


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def config_mapping(config: FlywheelConfig, relative_to: Path | None = None) -> dict[str, Any]:
    """The config as the mapping a config file holds, every key written out; paths under
    `relative_to` (the file's directory) relative to it."""
    data = asdict(config)
    for name in PATH_KEYS:
        data[name] = _relative_path(getattr(config, name), relative_to)
    for name in PROMPT_KEYS:
        source = getattr(config, name)
        if source.path is not None and source == PromptSource(path=source.path):
            data[name] = _relative_path(source.path, relative_to)  # the `prompts: FILE` shorthand
        else:
            given = {key: value for key, value in asdict(source).items()
                     if value is not None and value != getattr(PromptSource, key, None)}
            data[name] = {key: _relative_path(value, relative_to) if isinstance(value, Path) else value
                          for key, value in given.items()}
    return data


def write_config_file(path: Path, run_file: RunFile, header: str = "",
                      replace: Mapping[str, Any] | None = None) -> Path:
    """Write `run_file` as the YAML `load_config_file` reads back, top-level values in
    `replace` put in place of the config's, `header` (comment lines) first."""
    path = Path(path)
    data = {**config_mapping(run_file.config, path.parent.resolve()), **(replace or {})}
    ordered = {}
    for key, value in data.items():
        ordered[key] = value
        if key == "heldout_prompts":
            ordered["rounds"] = run_file.rounds
    path.parent.mkdir(parents=True, exist_ok=True)
    text = header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False, allow_unicode=True)
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(text, encoding="utf-8")
    scratch.replace(path)
    return path


def _relative_path(path: Path, base: Path | None) -> str:
    if base is not None and path.is_relative_to(base):
        return str(path.relative_to(base)) or "."
    return str(path)


# Keys that an earlier version took, and what replaced them.
RENAMED_KEYS = {"train.bf16": "train.dtype: bfloat16"}


def _unknown_key(key: str, where: str, keys: Sequence[str]) -> UserError:
    if key in RENAMED_KEYS:
        return UserError(f"{key!r} is gone: use {RENAMED_KEYS[key]}")
    return UserError(f"unknown key {key!r} ({where or 'the top level'} takes: {', '.join(keys)})")


def config_from_mapping(cls: type, data: Mapping[str, Any], where: str = "", base: Path = Path("."),
                        extra_keys: tuple[str, ...] = ()) -> Any:
    """Build the config dataclass `cls` from a mapping (parsed YAML or JSON), checking every
    value against the field's type hint; `where` is the dotted path for messages, `base`
    the directory relative paths start from. The class's own validation runs last."""
    keys = _keys(cls)
    for key in data:
        if key not in keys:
            raise _unknown_key(_dotted(where, key), where, [*keys, *extra_keys])
    missing = [_dotted(where, key) for key in _required_keys(cls) if key not in data]
    if missing:
        raise UserError(f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    hints = get_type_hints(cls)
    values = {key: _convert(value, hints[key], _dotted(where, key), base) for key, value in data.items()}
    try:
        return cls(**values)
    except UserError as error:
        # A nested class names itself by its usual key: `judge.spec` is `eval.judge.spec` there.
        message, leaf = str(error), where.rpartition(".")[2]
        if leaf != where and message.startswith(leaf + "."):
            message = where + message[len(leaf):]
        raise UserError(message) from None


def _convert(value: Any, hint: Any, where: str, base: Path) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {hint}")
        hint, origin = options[0], get_origin(options[0])
    if hint is Any:
        return value
    if hint in SHORTHAND_KEYS and isinstance(value, (str, Path)):
        value = {SHORTHAND_KEYS[hint]: str(value)}
    if is_dataclass(hint):
        _require(isinstance(value, Mapping), f"{where} must be a mapping, got {_shown(value)}")
        built = config_from_mapping(hint, value, where, base)
        return built.resolved(base) if isinstance(built, PromptSource) else built
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                Path: "a path (a string)", dict: "a mapping with string keys"}.get(origin or hint)
    if expected is None:
        raise TypeError(f"{where}: no conversion for type {hint}")
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str) and bool(value),
          dict: isinstance(value, Mapping) and all(isinstance(key, str) for key in value)}[origin or hint]
    _require(ok, f"{where} must be {expected}, got {_shown(value)}")
    if hint is float:
        return float(value)
    if hint is Path:
        return base / Path(value).expanduser()
    if origin is dict:
        return dict(value)
    return value


def _keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def _required_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]


def _dotted(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _shown(value: Any) -> str:
    """A value as a message shows it: YAML's words for null and booleans, a kind for collections."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
