"""What stages hand each other: the MedMCQA row schema and one typed report per stage.

A stage reads an earlier stage's output only through these classes, never by key: `TrainReport.read(reports)`
fails with the file's name and the stage to run when it is missing, and names the file and the key when a key is
missing. The JSON files and their keys are contracts other tools read (DVC metrics, dashboards), so the field names
below are exactly the keys on disk; `write` and `read` round-trip them. Registry tags (strings) are derived here too,
so the tag a version carries and the report it came from cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from medlora.core.io import read_json, write_json

# MedMCQA's hub schema: every split file of a snapshot has these columns, in this order.
COLUMNS: tuple[str, ...] = (
    "id",
    "question",
    "opa",
    "opb",
    "opc",
    "opd",
    "cop",
    "choice_type",
    "exp",
    "subject_name",
    "topic_name",
)
OPTION_COLUMNS: tuple[str, ...] = ("opa", "opb", "opc", "opd")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHOICE_TYPES: tuple[str, ...] = ("single", "multi")
UNLABELED_COP = -1  # the hub's test split has no answers


class ContractError(ValueError):
    """A stage output that is missing or lacks a key its reader needs; the message names the file and the stage."""


class StageFailed(RuntimeError):
    """A stage stopped on purpose (a failed gate or check); `report`, when given, is still written for people."""

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


def _from_value(annotation: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return annotation.from_dict(value)
    for option in typing.get_args(annotation):  # X | None
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return option.from_dict(value)
    return value


@dataclass(frozen=True)
class Report:
    """Base of the stage reports: `reports/<FILE>` written by stage `STAGE`."""

    FILE: ClassVar[str]
    STAGE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The report as it is on disk: plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), allow_nan=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Self:
        """Build from a parsed file; raises ContractError naming `source` and the first missing required key."""
        hints = typing.get_type_hints(cls)
        values = {}
        for spec in dataclasses.fields(cls):
            if spec.name in data:
                values[spec.name] = _from_value(hints[spec.name], data[spec.name])
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                where = source or cls.FILE
                raise ContractError(
                    f"{where} has no {spec.name!r}: rerun the {cls.STAGE} stage (dvc repro {cls.STAGE})"
                )
        return cls(**values)

    @classmethod
    def path(cls, reports_dir: str | Path) -> Path:
        return Path(reports_dir) / cls.FILE

    @classmethod
    def read(cls, reports_dir: str | Path) -> Self:
        path = cls.path(reports_dir)
        if not path.is_file():
            raise ContractError(f"{path} is missing: run the {cls.STAGE} stage first (dvc repro {cls.STAGE})")
        return cls.from_dict(read_json(path), str(path))

    def write(self, reports_dir: str | Path) -> Path:
        path = self.path(reports_dir)
        write_json(path, self.to_dict())
        return path

    def summary(self) -> str:
        """One line for the stage's log."""
        return f"{self.STAGE}: wrote {self.FILE}"


@dataclass(frozen=True)
class ParamsReport(Report):
    """The `params` stage's verdict on params.yaml. Its bytes depend only on which sections exist, so a changed value
    does not make every stage downstream of it rerun; only the stages that read the value do."""

    FILE: ClassVar[str] = "params.json"
    STAGE: ClassVar[str] = "params"

    valid: bool
    sections: list[str]

    def summary(self) -> str:
        return f"params: params.yaml is valid ({', '.join(self.sections)})"


@dataclass(frozen=True)
class ValidationReport(Report):
    FILE: ClassVar[str] = "validation.json"
    STAGE: ClassVar[str] = "validate"

    success: bool  # the kept rows are fit to use
    clean: bool  # no row was flagged at all
    on_error: str
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    splits: dict[str, dict[str, int]]
    rules: dict[str, dict[str, Any]]

    def tags(self) -> dict[str, str]:
        return {"validation_success": str(self.success)}

    def summary(self) -> str:
        return (
            f"validation: {self.rows_in} rows in, {self.rows_kept} kept, {self.rows_quarantined} quarantined; "
            f"success={self.success}"
        )


@dataclass(frozen=True)
class ModelReport(Report):
    FILE: ClassVar[str] = "model.json"
    STAGE: ClassVar[str] = "model"

    preset: str
    name_or_path: str | None
    revision: str | None
    torch_dtype: str
    weights_sha256: str | None = None
    num_parameters: int | None = None
    chat_template_checks: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        where = self.name_or_path or "built here"
        return f"model: preset {self.preset} ({where}), {self.torch_dtype}, checks {self.chat_template_checks}"


@dataclass(frozen=True)
class FormatReport(Report):
    FILE: ClassVar[str] = "format.json"
    STAGE: ClassVar[str] = "format"

    rows_in: int
    rows_kept: int
    rows_dropped: int
    rows_truncated: int
    unlabeled_skipped: int
    dropped_by_reason: dict[str, int]
    dropped_ids: list[str]
    token_lengths: dict[str, float]
    completion_tokens: dict[str, float]
    train_rows: int
    early_stop_rows: int
    early_stop_source: str
    max_length: int
    on_overflow: str
    include_explanation: bool
    mask_source: str
    seconds: float
    rows_per_second: float | None

    def summary(self) -> str:
        return (
            f"format: {self.rows_in} rows in, {self.rows_kept} kept ({self.train_rows} train, {self.early_stop_rows} "
            f"early stop), {self.rows_dropped} dropped, {self.rows_truncated} truncated, {self.unlabeled_skipped} "
            f"unlabeled, {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class TrainReport(Report):
    FILE: ClassVar[str] = "train.json"
    STAGE: ClassVar[str] = "train"

    backend: str
    batching: str
    trainable_params_by_block: dict[str, int]
    trainable_params: int
    total_params: int
    coverage: dict[str, Any]  # the coverage gate's verdict (`passed`, ...) and, after step 1, `gradient_check`
    params_hash: str
    inputs_hash: str
    mlflow_run_id: str | None = None
    distributed: dict[str, Any] | None = None
    global_step: int | None = None
    resumed_from_step: int | None = None
    steps_this_run: int | None = None
    train_loss: float | None = None
    eval_loss_initial: float | None = None
    eval_loss_final: float | None = None
    train_seconds: float | None = None
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    @property
    def coverage_passed(self) -> bool | None:
        passed = self.coverage.get("passed")
        return passed if isinstance(passed, bool) else None

    def require_run_id(self, reports_dir: str | Path) -> str:
        """The pipeline's MLflow run id; raises ContractError when the train stage left none (it failed)."""
        if not self.mlflow_run_id:
            raise ContractError(f"{self.path(reports_dir)} has no mlflow_run_id: rerun the train stage")
        return self.mlflow_run_id

    def tags(self) -> dict[str, str]:
        return {"coverage_passed": str(self.coverage_passed)}

    def summary(self) -> str:
        return (
            f"train: {self.steps_this_run} steps in {self.train_seconds} s ({self.tokens_per_second} tokens/s); "
            f"eval loss {self.eval_loss_initial} -> {self.eval_loss_final}"
        )


@dataclass(frozen=True)
class MergeReport(Report):
    FILE: ClassVar[str] = "merge.json"
    STAGE: ClassVar[str] = "merge"

    max_abs_logit_diff: float
    in_memory_max_abs_logit_diff: float
    parity_max_abs_diff: float
    parity_rows: int
    parity_tokens: int
    success: bool
    dtype: str = "float32"
    mean_abs_answer_logprob_diff: float | None = None
    adapter_effect_mean_abs_logprob: float | None = None  # mean |adapter - base| on the answer tokens
    parity_metric: str = "max_abs_logit_diff"  # the figure the dtype's tolerance applies to
    parity_threshold: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["error"] is None:  # the key exists only when the merge failed
            del data["error"]
        return data

    def summary(self) -> str:
        return f"merge: max |adapter - merged| logit {self.max_abs_logit_diff:.3g}; success={self.success}"


# The gate keys registry versions carry as `gate.<key>` tags (the champion is read back from them).
GATE_TAG_KEYS: tuple[str, ...] = ("metric", "base", "adapter", "merged", "uplift", "p_value", "merged_vs_adapter")


def _tag_number(value: Any) -> float | None:
    if value is None or value in ("", "None"):
        return None
    return float(value)


@dataclass(frozen=True)
class EvalGate:
    """The primary metric for base, adapter and merged, and the paired test of adapter against base."""

    metric: str
    base: float | None
    adapter: float | None
    merged: float | None
    uplift: float | None
    p_value: float | None
    test: str | None
    n_paired: int
    merged_vs_adapter: float | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalGate:
        missing = [spec.name for spec in dataclasses.fields(cls) if spec.name not in data]
        if missing:
            raise ContractError(f"eval.json gate has no {missing[0]!r}: rerun the evaluate stage")
        return cls(**{spec.name: data[spec.name] for spec in dataclasses.fields(cls)})

    def tags(self) -> dict[str, str]:
        """As registry tags `gate.<key>` (tags are strings)."""
        return {f"gate.{key}": str(getattr(self, key)) for key in GATE_TAG_KEYS}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvalGate:
        """Inverse of `tags` (the paired test's name and size are not tagged); raises ContractError without
        `gate.metric`."""
        if not tags.get("gate.metric"):
            raise ContractError("the version has no gate.metric tag: it was not registered by the register stage")
        numbers = {key: _tag_number(tags.get(f"gate.{key}")) for key in GATE_TAG_KEYS if key != "metric"}
        return cls(metric=tags["gate.metric"], test=None, n_paired=0, **numbers)


@dataclass(frozen=True)
class EvalReport(Report):
    FILE: ClassVar[str] = "eval.json"
    STAGE: ClassVar[str] = "evaluate"

    gate: EvalGate
    primary_metric: str
    results: dict[str, dict[str, Any]]
    runs: dict[str, dict[str, Any]]
    tasks: list[str]
    backend: str
    source: str
    limit: int | None
    batch_size: int
    validation_file: str
    wall_seconds: float
    # sha256 of validation_file as scored; None from an evaluate stage that did not record it (the register stage
    # then hashes validation_file itself). The gates compare a candidate with a champion only on the same data.
    validation_sha256: str | None = None

    def summary(self) -> str:
        g = self.gate
        return (
            f"evaluate: {g.metric} base {g.base} adapter {g.adapter} merged {g.merged} uplift {g.uplift} "
            f"p {g.p_value} ({self.wall_seconds:.1f} s)"
        )


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    created: bool
    run_id: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegisteredVersion:
        return cls(**{spec.name: data.get(spec.name) for spec in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Registration(Report):
    FILE: ClassVar[str] = "registration.json"
    STAGE: ClassVar[str] = "register"

    mlflow_run_id: str
    tracking_uri: str
    adapter: RegisteredVersion
    merged: RegisteredVersion | None
    merged_skipped: str | None
    gates_at_registration: list[str]
    tags: dict[str, str]
    # What killed register stages had left (half-registered versions, PENDING logged models, RUNNING runs), as
    # marked by this one: "<kind> <id>: <what was done>".
    leftovers_marked: list[str] = field(default_factory=list)

    def summary(self) -> str:
        merged = f"{self.merged.name} v{self.merged.version}" if self.merged else f"no merged ({self.merged_skipped})"
        return f"register: {self.adapter.name} v{self.adapter.version}, {merged}"


@dataclass(frozen=True)
class PromotionReport(Report):
    FILE: ClassVar[str] = "promotion.json"
    STAGE: ClassVar[str] = "promote"

    candidate: dict[str, str | None]
    decision: str  # promoted | rejected
    forced: bool
    reasons: list[str]
    champion_before: dict[str, str | None]
    champion_after: dict[str, str | None]

    def summary(self) -> str:
        failed = [reason for reason in self.reasons if reason.startswith("FAIL")]
        return f"promote: {self.candidate} {self.decision}" + (f" ({'; '.join(failed)})" if failed else "")
