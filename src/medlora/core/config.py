"""`params.yaml` parsed once into frozen, typed objects.

Every section is a frozen dataclass whose field names are the names of the library fields they feed
(`LoraConfig.r`, `SFTConfig.learning_rate`, ...), so a section can be handed on without a mapping table.
An unknown or misspelled key raises `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:  # contracts imports io; config is imported by everything, so the import stays lazy at run time
    from medlora.core.contracts import ParamsReport

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params file that does not match the schema: the message names the file and the key."""


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = "data/medmcqa"
    reports_dir: str = "reports"
    quarantine_dir: str = "outputs/quarantine"
    validated_dir: str = "outputs/validated"
    base_model_dir: str = "outputs/base_model"
    formatted_dir: str = "outputs/formatted"
    checkpoints_dir: str = "outputs/checkpoints"
    adapter_dir: str = "outputs/adapter"
    merged_dir: str = "outputs/merged"
    eval_dir: str = "outputs/eval"
    mlruns_dir: str = "mlruns"


@dataclass(frozen=True)
class SnapshotConfig:
    source: Literal["synthetic", "hub", "original"] = "synthetic"
    hub_dataset: str = "openlifescienceai/medmcqa"
    revision: str | None = "91c6572c454088bf71b679ad90aa8dffcd0d5868"  # a commit: a branch would move under us
    seed: int = 1234
    train_size: int = 2000
    validation_size: int = 300
    test_size: int = 100


@dataclass(frozen=True)
class ValidateConfig:
    on_error: Literal["fail", "quarantine"] = "quarantine"
    question_min_chars: int = 5
    question_max_chars: int = 2000
    option_max_chars: int = 500


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny-nemotron-h"
    name_or_path: str | None = None
    revision: str | None = None
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0


@dataclass(frozen=True)
class FormatConfig:
    system_prompt: str = "You are a medical expert. Answer the multiple choice question."
    include_explanation: bool = False
    max_length: int = 256
    on_overflow: Literal["drop", "truncate"] = "drop"
    early_stopping_size: int = 100


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj",
        "up_proj",
        "down_proj",
    )
    target_parameters: tuple[str, ...] = ()
    required_blocks: tuple[str, ...] = ("mamba", "attention", "moe_shared_expert")


@dataclass(frozen=True)
class TrainConfig:
    backend: Literal["hf", "unsloth", "auto"] = "hf"
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1
    max_steps: int = 80
    optim: str = "adamw_torch"
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 5
    eval_steps: int = 20
    save_steps: int = 40
    save_total_limit: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    train_sampling_strategy: Literal["group_by_length", "random", "sequential"] = "group_by_length"
    max_grad_norm: float = 1.0
    seed: int = 42
    loss_explosion_factor: float = 10.0
    gpu_memory: str | None = None
    allow_reference_mamba_scan: bool = False  # on a GPU without mamba-ssm: train through the slow torch scan anyway


@dataclass(frozen=True)
class MergeConfig:
    parity_max_abs_diff: float = 1e-4  # float32: max |logit difference|, adapter vs reloaded merged model
    parity_max_answer_logprob_diff: float = 0.05  # bf16/fp16: mean |difference| of answer-token log-probs (nats)
    parity_max_fraction_of_effect: float = 0.25  # bf16/fp16: or this fraction of the adapter's effect, if larger


@dataclass(frozen=True)
class EvaluateConfig:
    backend: Literal["hf", "vllm"] = "hf"
    source: Literal["local", "hub"] = "local"
    tasks: tuple[str, ...] = ("medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik")
    primary_metric: str = "auto"
    batch_size: int = 4  # tiny preset on CPU: 1.6x the questions/s of 16 (benchmarks/eval_throughput.py)
    limit: int | None = None
    models: tuple[str, ...] = ("base", "adapter", "merged")


@dataclass(frozen=True)
class RegisterConfig:
    adapter_name: str = "medlora-adapter"
    merged_name: str = "medlora-merged"
    register_merged: Literal["always", "if_promotable"] = "always"


@dataclass(frozen=True)
class PromoteConfig:
    min_value: float | None = None
    min_uplift: float = 0.0
    max_p_value: float = 0.01
    champion_tolerance: float = 0.0
    champion_margin: float = 0.0
    max_merged_vs_adapter_rel: float = 0.01
    require_validation: bool = True
    require_coverage: bool = True


@dataclass(frozen=True)
class Params:
    paths: PathsConfig = field(default_factory=PathsConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as it would be written to YAML."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and `dvc exp run -S` use."""
        return {
            f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()
        }

    def params_hash(self) -> str:
        """Stable short hash of every param: a tag that says two runs had the same configuration."""
        canonical = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; tuples come from YAML lists, ints may stand for floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value or {}, f"{where}.{name}" if where else name)
        else:
            values[name] = _coerce(value, annotation, f"{where}.{name}" if where else name)
    return cls(**values)


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Build `Params` from a parsed YAML mapping; raises `ConfigError` naming `source` and the bad key."""
    try:
        return _build(Params, raw or {}, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a params file (default: `params.yaml` in the working directory)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file (run from the project root)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))


def run(params: Params) -> ParamsReport:
    """The `params` stage, first in dvc.yaml: `run_stage` has already parsed params.yaml (a typo exits 2 with the
    message, before DVC has deleted any later stage's outputs); what is left is to say so."""
    from medlora.core.contracts import ParamsReport  # contracts imports io, which needs nothing from here

    return ParamsReport(valid=True, sections=[spec.name for spec in dataclasses.fields(params)])
