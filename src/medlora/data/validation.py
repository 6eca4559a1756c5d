"""The `validate` stage: a great-expectations suite over every split of the snapshot, and a quarantine.

Rules (each a GX expectation; `reports/validation.json` counts rows per rule):
  schema_types, not_null         column types (`exp`, `topic_name` may be null; everything else may not)
  cop_in_range                   0-3; the unlabeled test split may also hold -1
  choice_type_in_set             single | multi
  options_non_empty, option_length   four options, none blank, none over `option_max_chars`
  question_length                `question_min_chars`..`question_max_chars`
  img_placeholder                an option that is only an `<img ...>` tag, or a question holding one: the
                                 image never came with the text, so the row cannot be answered. Other HTML
                                 (`</li>`, `<a href=`) is left alone, as are null `exp`, repeated options,
                                 words missing "rt" and newlines: real MedMCQA rows look like that.
  id_unique                      within a split (every copy is flagged: which one is right is unknowable)
  id_unique_across_splits        checked against the splits that rank higher: validation, then test, then
                                 train, so the copy in the lower-ranked split is the one flagged
  contamination_exact, contamination_normalized
                                 a train question that also occurs in validation or test, exactly or after
                                 normalizing case, space and punctuation (lm-eval scores the validation split);
                                 the TRAIN copy is flagged (an exact copy counts under both rules).

Wrong-typed values (a bool `cop` among them) are checked by `schema_types` only; the content rules see them as
null (GX skips nulls).
`on_error: quarantine` moves every flagged row to `outputs/quarantine/{split}.jsonl` with its reasons and keeps
the rest; `fail` stops the stage (after writing the report). Either way rows_in == rows_kept + rows_quarantined.
A file that cannot be parsed at all stops the stage before any rule runs (`schema.SnapshotParseError`).
In the report, `clean` means no row was flagged; `success` means the kept rows are fit to use: every split
keeps rows and, under `fail`, nothing was flagged.
"""

from __future__ import annotations

import logging
import os
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd

from medlora.core.config import Params, ValidateConfig
from medlora.core.contracts import (
    CHOICE_TYPES,
    COLUMNS,
    OPTION_COLUMNS,
    SPLITS,
    UNLABELED_COP,
    StageFailed,
    ValidationReport,
)
from medlora.core.io import atomic_directory, write_jsonl
from medlora.data.schema import SnapshotParseError, read_split, split_path

log = logging.getLogger(__name__)

RULES: tuple[str, ...] = (
    "schema_types",
    "not_null",
    "cop_in_range",
    "choice_type_in_set",
    "options_non_empty",
    "option_length",
    "question_length",
    "img_placeholder",
    "id_unique",
    "id_unique_across_splits",
    "contamination_exact",
    "contamination_normalized",
)
NULLABLE = ("exp", "topic_name")
PRECEDENCE = ("validation", "test", "train")  # who keeps a shared id: the split scored by lm-eval first
IMG_ONLY = r"(?is)^\s*(?:<img\b[^>]*>\s*)+$"
IMG_ANY = r"(?i)<img\b"
BLANK = r"^\s*$"
EXAMPLE_IDS = 5
RAW = "raw:"  # prefix of the untouched columns the type and null rules read
TYPE_OF = "type:"  # prefix of a column holding the type name of each raw value (null stays null)


class ValidationFailed(StageFailed):
    """`on_error: fail` and at least one rule flagged a row; the message names rules and example ids."""


def normalize_question(text: str) -> str:
    """Case, space and punctuation folded away: "What is  X?" and "what is x" compare equal."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def read_snapshot(data_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every split, strictly parsed; raises SnapshotParseError naming file, line and problem."""
    splits = {}
    for split in SPLITS:
        path = split_path(data_dir, split)
        if not path.is_file():
            raise SnapshotParseError(path, None, "file is missing (run `medlora restore` or `medlora snapshot`)")
        splits[split] = read_split(data_dir, split)
    return splits


def build_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame: raw columns for the type/null rules, typed copies (wrong types -> None) for the rest."""
    frame = pd.DataFrame({f"{RAW}{c}": pd.Series([r.get(c) for r in rows], dtype=object) for c in COLUMNS})
    for column in COLUMNS:
        values = frame[f"{RAW}{column}"]
        if column == "cop":
            keep = [isinstance(v, int) and not isinstance(v, bool) for v in values]
        else:
            keep = [isinstance(v, str) for v in values]
        frame[column] = values.where(keep, None)
    # GX's type rule is an isinstance check, and to Python a bool is an int: `cop: true` would pass it, then read
    # as answer B downstream. So cop's type is checked by name.
    frame[f"{TYPE_OF}cop"] = [type(v).__name__ if v is not None else None for v in frame[f"{RAW}cop"]]
    frame["question_normalized"] = [normalize_question(q) if isinstance(q, str) else None for q in frame["question"]]
    return frame


def seen_in(values: pd.Series, others: dict[str, pd.Series]) -> pd.Series:
    """For each value, the first of `others` (split name -> values, in rank order) that also holds it, else None."""
    first: dict[Any, str] = {}
    for split, column in reversed(others.items()):  # reversed: the highest-ranked split is written last and wins
        first.update(dict.fromkeys(column.dropna(), split))
    return pd.Series([first.get(v) if v is not None else None for v in values], index=values.index, dtype=object)


def add_cross_split_columns(frames: dict[str, pd.DataFrame]) -> None:
    """Columns that let per-split expectations see the other splits, without shipping them as value sets.

    `id_seen_in_higher_split`: the higher-ranked split (PRECEDENCE) that holds the same id, or None.
    `question_seen_in_eval` / `question_normalized_seen_in_eval` (train only): the evaluation split that holds
    the same question, or None. GX expects these to be null; a value set of 10k ids costs GX seconds a split.
    """
    for split, frame in frames.items():
        higher = [s for s in PRECEDENCE[: PRECEDENCE.index(split)] if s in frames]
        frame["id_seen_in_higher_split"] = seen_in(frame["id"], {s: frames[s]["id"] for s in higher})
    evaluation = [s for s in ("validation", "test") if s in frames]
    if "train" in frames:
        for column in ("question", "question_normalized"):
            others = {s: frames[s][column] for s in evaluation}
            frames["train"][f"{column}_seen_in_eval"] = seen_in(frames["train"][column], others)


def expectation_specs(split: str, config: ValidateConfig) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The suite for one split as (rule, frame column, GX expectation class name, kwargs); pure, testable alone."""
    specs: list[tuple[str, str, str, dict[str, Any]]] = []
    for column in COLUMNS:
        if column == "cop":  # by type name: a bool is not a label (see build_frame)
            specs.append(("schema_types", TYPE_OF + column, "ExpectColumnValuesToBeInSet", {"value_set": ["int"]}))
        else:
            specs.append(("schema_types", RAW + column, "ExpectColumnValuesToBeInTypeList", {"type_list": ["str"]}))
        if column not in NULLABLE:
            specs.append(("not_null", RAW + column, "ExpectColumnValuesToNotBeNull", {}))
    cops = [UNLABELED_COP, 0, 1, 2, 3] if split == "test" else [0, 1, 2, 3]
    specs.append(("cop_in_range", "cop", "ExpectColumnValuesToBeInSet", {"value_set": cops}))
    choice_types = {"value_set": list(CHOICE_TYPES)}
    specs.append(("choice_type_in_set", "choice_type", "ExpectColumnValuesToBeInSet", choice_types))
    for column in OPTION_COLUMNS:
        specs.append(("options_non_empty", column, "ExpectColumnValuesToNotMatchRegex", {"regex": BLANK}))
        too_long = {"max_value": config.option_max_chars}
        specs.append(("option_length", column, "ExpectColumnValueLengthsToBeBetween", too_long))
        specs.append(("img_placeholder", column, "ExpectColumnValuesToNotMatchRegex", {"regex": IMG_ONLY}))
    bounds = {"min_value": config.question_min_chars, "max_value": config.question_max_chars}
    specs.append(("question_length", "question", "ExpectColumnValueLengthsToBeBetween", bounds))
    specs.append(("question_length", "question", "ExpectColumnValuesToNotMatchRegex", {"regex": BLANK}))
    specs.append(("img_placeholder", "question", "ExpectColumnValuesToNotMatchRegex", {"regex": IMG_ANY}))
    specs.append(("id_unique", "id", "ExpectColumnValuesToBeUnique", {}))
    if split != PRECEDENCE[0]:
        specs.append(("id_unique_across_splits", "id_seen_in_higher_split", "ExpectColumnValuesToBeNull", {}))
    if split == "train":
        specs.append(("contamination_exact", "question_seen_in_eval", "ExpectColumnValuesToBeNull", {}))
        specs.append(("contamination_normalized", "question_normalized_seen_in_eval", "ExpectColumnValuesToBeNull", {}))
    return specs


def gx_context() -> Any:
    """An ephemeral GX context (nothing on disk), quiet: no progress bars, no usage statistics."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import logs every decorator at INFO
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)  # it sets INFO itself
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def run_suite(context: Any, split: str, frame: pd.DataFrame, specs: list) -> dict[int, list[str]]:
    """Run one split's suite; returns {row position: ["rule: column", ...]} for every flagged row.

    Raises RuntimeError if GX itself raised inside an expectation (a bug, not a data problem).
    """
    import great_expectations as gx

    source = context.data_sources.add_pandas(f"medlora-{split}")
    batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe(split)
    expectations = []
    for rule, column, kind, kwargs in specs:
        meta = {"rule": rule, "column": column.removeprefix(RAW).removeprefix(TYPE_OF)}
        expectations.append(getattr(gx.expectations, kind)(column=column, meta=meta, **kwargs))
    # Built whole, then added once: adding expectations one by one to a stored suite re-serializes it each time.
    suite = context.suites.add(gx.ExpectationSuite(name=f"medmcqa-{split}", expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=split, data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})
    flagged: dict[int, list[str]] = {}
    for outcome in result.results:
        meta = outcome.expectation_config.meta
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            raise RuntimeError(f"{split}: GX raised in {meta}: {outcome.exception_info.get('exception_message')}")
        for index in outcome.result.get("unexpected_index_list") or []:
            flagged.setdefault(int(index), []).append(f"{meta['rule']}: {meta['column']}")
    return flagged


def row_label(row: dict[str, Any], split: str, position: int) -> str:
    """The row's id for a report, or its place in the file when the id itself is unusable."""
    row_id = row.get("id")
    return row_id if isinstance(row_id, str) and row_id else f"<{split} row {position + 1}>"


def check_splits(splits: dict[str, list[dict[str, Any]]], config: ValidateConfig) -> dict[str, dict[int, list[str]]]:
    """Run the suite over every split; returns {split: {row position: reasons}} (cross-split rules included)."""
    started = time.perf_counter()
    frames = {split: build_frame(rows) for split, rows in splits.items()}
    add_cross_split_columns(frames)
    log.info("frames for %s built in %.1f s", ", ".join(frames), time.perf_counter() - started)
    context = gx_context()
    flagged = {}
    for split, frame in frames.items():
        specs = expectation_specs(split, config)
        started = time.perf_counter()
        flagged[split] = run_suite(context, split, frame, specs)
        log.info(
            "%s: %d rows, %d expectations, %d rows flagged (%.1f s)",
            split,
            len(frame),
            len(specs),
            len(flagged[split]),
            time.perf_counter() - started,
        )
    return flagged


def summarize(
    splits: dict[str, list[dict[str, Any]]], flagged: dict[str, dict[int, list[str]]], on_error: str
) -> ValidationReport:
    """The report: success, per split rows_in/kept/quarantined, per rule count (rows) and example ids."""
    rules = {rule: {"count": 0, "ids": [], "splits": {}} for rule in RULES}
    per_split = {}
    for split, rows in splits.items():
        for position, reasons in sorted(flagged[split].items()):
            for rule in sorted({reason.split(":")[0] for reason in reasons}):
                entry = rules[rule]
                entry["count"] += 1
                entry["splits"][split] = entry["splits"].get(split, 0) + 1
                if len(entry["ids"]) < EXAMPLE_IDS:
                    entry["ids"].append(row_label(rows[position], split, position))
        quarantined = len(flagged[split])
        per_split[split] = {"rows_in": len(rows), "rows_kept": len(rows) - quarantined, "rows_quarantined": quarantined}
        assert per_split[split]["rows_in"] == per_split[split]["rows_kept"] + per_split[split]["rows_quarantined"]
    clean = not any(flagged.values())
    usable = all(counts["rows_kept"] > 0 for counts in per_split.values())
    totals = {
        key: sum(counts[key] for counts in per_split.values()) for key in ("rows_in", "rows_kept", "rows_quarantined")
    }
    return ValidationReport(
        success=usable and (clean or on_error == "quarantine"),
        clean=clean,
        on_error=on_error,
        **totals,
        splits=per_split,
        rules=rules,
    )


def partition(
    splits: dict[str, list[dict[str, Any]]], flagged: dict[str, dict[int, list[str]]]
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(kept rows in hub column order, quarantined rows as read plus "reasons"), per split."""
    kept, quarantined = {}, {}
    for split, rows in splits.items():
        marks = flagged[split]
        kept[split] = [{c: row[c] for c in COLUMNS} for i, row in enumerate(rows) if i not in marks]
        quarantined[split] = [{**row, "reasons": marks[i]} for i, row in enumerate(rows) if i in marks]
        assert len(kept[split]) + len(quarantined[split]) == len(rows), f"{split}: rows lost in partition"
    return kept, quarantined


def run(params: Params) -> ValidationReport:
    """The stage: read the snapshot, run the suite, write kept and quarantined rows; returns the report.

    Raises SnapshotParseError for an unreadable file, and ValidationFailed (carrying the report; the row outputs are
    not written) under `on_error: fail` when any row is flagged or when a split keeps no rows.
    """
    config, paths = params.validate, params.paths
    splits = read_snapshot(paths.data_dir)
    flagged = check_splits(splits, config)
    report = summarize(splits, flagged, config.on_error)
    failing = {rule: entry for rule, entry in report.rules.items() if entry["count"]}
    if config.on_error == "fail" and failing:
        detail = "; ".join(f"{rule}: {e['count']} rows, e.g. {', '.join(e['ids'][:3])}" for rule, e in failing.items())
        raise ValidationFailed(
            f"validation failed (on_error: fail): {detail}. See {paths.reports_dir}/{report.FILE}", report
        )
    kept, quarantined = partition(splits, flagged)
    with atomic_directory(paths.validated_dir) as out:
        for split, rows in kept.items():
            write_jsonl(split_path(out, split), rows)
    with atomic_directory(paths.quarantine_dir) as out:
        for split, rows in quarantined.items():
            write_jsonl(split_path(out, split), rows)
    for split, counts in report.splits.items():
        log.info("%-10s in %6d  kept %6d  quarantined %5d", split, *counts.values())
    if not report.success:
        raise ValidationFailed(f"a split has no rows left after quarantine: {report.splits}", report)
    return report
