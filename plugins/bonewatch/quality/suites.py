"""Great Expectations suites for the parsed feeds, built in code on an ephemeral context.

Parsing (ingest/) decides what a row *is* (code, number, unit, date); these suites decide whether
the parsed, canonical rows are *plausible*. Rows that an expectation flags are quarantined with the
expectation's description as the reason, so a GX failure is never silent.

Chain as in the GX 1.x docs: pandas data source -> dataframe asset -> whole-dataframe batch
definition; suite -> ValidationDefinition -> run(batch_parameters={"dataframe": df}).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import pandas as pd

from bonewatch.quality import gx_context
from bonewatch.units import ANALYTES

log = logging.getLogger(__name__)

LAB_STATUSES = ["preliminary", "final", "corrected", "cancelled"]

# Cost, measured (issue 8): GX hashes every column of the batch it is given (about 0.4 s a
# million rows) and evaluates each `row_condition` with a pandas query (about 0.5 s a million rows
# per analyte). So each chunk is validated on a narrow projection (the columns the suite checks),
# and the plausible ranges of all analytes are one unconditioned expectation on the value's
# position within its own analyte's range (0 = low limit, 1 = high limit; no range = null, not
# checked). The row-level quarantine verdict for those ranges is made, vectorised, by
# `bonewatch.ingest.feeds.implausible`; GX measures and records the same ranges per chunk.
POSITION = "plausible_position"
_PLAUSIBLE_DESCRIPTION = "value within its analyte's plausible range ([ingest.plausible])"
_CHECKED = {"labs": ["patient_id", "result_id", "analyte", "status", "collected_at"],
            "events": ["patient_id", "event_type", "occurred_at"]}
_EVENT_ANALYTES = {"weight_kg": "weight", "albuminuria_mg_24h": "urine_albumin_24h"}


def plausible_position(kind: str, frame: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> pd.Series:
    """(value - low) / (high - low) of each row's own range; NaN where no range applies."""
    if kind == "labs":
        key, value = frame["analyte"], frame["value"]
        ranges = {a: r for a, r in plausible.items() if a in ANALYTES}
    else:
        key, value = frame["event_type"], frame["number"]
        ranges = {e: plausible[a] for e, a in _EVENT_ANALYTES.items() if a in plausible}
    low = key.map({k: r[0] for k, r in ranges.items()}).astype("float64")
    high = key.map({k: r[1] for k, r in ranges.items()}).astype("float64")
    return (value.astype("float64") - low) / (high - low)


@dataclass
class Validation:
    """Outcome of one suite run over one chunk."""

    passed: int = 0
    failed: int = 0
    bad_rows: dict[object, str] = field(default_factory=dict)  # frame index -> reason
    results: list[dict] = field(default_factory=list)


@lru_cache(maxsize=8)
def _validation_definition(kind: str, plausible_key: tuple):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in list(logging.root.manager.loggerDict):  # GX sets its own levels on import
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    context = gx_context("ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(f"{kind}_source")
        .add_dataframe_asset(kind)
        .add_batch_definition_whole_dataframe("chunk")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{kind}_suite"))
    E = gx.expectations
    if kind == "labs":
        for column in ("patient_id", "result_id", "analyte", "collected_at"):
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(
                column=column, description=f"{column} is present"))
        suite.add_expectation(E.ExpectColumnValuesToBeInSet(
            column="status", value_set=LAB_STATUSES, description="status is a known result status"))
        suite.add_expectation(E.ExpectColumnValuesToBeInSet(
            column="analyte", value_set=sorted(ANALYTES), description="analyte is monitored"))
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(
            column=POSITION, min_value=0, max_value=1, description=_PLAUSIBLE_DESCRIPTION))
    elif kind == "events":
        for column in ("patient_id", "event_type", "occurred_at"):
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(
                column=column, description=f"{column} is present"))
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(
            column=POSITION, min_value=0, max_value=1, description=_PLAUSIBLE_DESCRIPTION))
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    return context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{kind}_validation", data=batch, suite=suite))


def run_definition(definition, frame: pd.DataFrame, result_format: str):
    """`definition.run(batch_parameters={"dataframe": frame}, ...)`, the same result (its meta
    included), without the two things a run adds for a stored context: checking that the suite and
    definition are unchanged since they were saved (~10 % of a run; ours are built in this process
    and never change) and keeping the result in the context's in-memory store (one result a chunk
    for the life of the process, never read: the results bonewatch keeps are `keep_results`')."""
    from great_expectations.constants import DATAFRAME_REPLACEMENT_STR
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.validator.v1_validator import Validator

    validator = Validator(batch_definition=definition.batch_definition, batch_parameters={"dataframe": frame},
                          result_format={"result_format": result_format})
    result = validator.validate_expectation_suite(definition.suite)
    run_id = RunIdentifier(run_time=datetime.now(UTC))
    result.meta.update({"validation_id": definition.id, "checkpoint_id": None, "run_id": run_id,
                        "validation_time": run_id.run_time,
                        "batch_parameters": {"dataframe": DATAFRAME_REPLACEMENT_STR}})
    return result


def validate(kind: str, frame: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> Validation:
    """Run the `kind` suite ("labs" or "events") on a parsed chunk; return flagged rows by index."""
    outcome = Validation()
    if frame.empty:
        return outcome
    key = tuple(sorted((a, tuple(r)) for a, r in plausible.items() if a in ANALYTES))
    definition = _validation_definition(kind, key)
    # A named index makes GX report {name: value} dicts; plain labels are easier to map back.
    checked = frame[_CHECKED[kind]].rename_axis(None).assign(**{POSITION: plausible_position(kind, frame, plausible)})
    run = run_definition(definition, checked, "SUMMARY")
    if any(not r.success and r.expectation_config.description != _PLAUSIBLE_DESCRIPTION for r in run.results):
        # rows the parsers should have caught: ask GX which (rare, so the full format only then)
        run = run_definition(definition, checked, "COMPLETE")
    if (kept := _KEPT.get()) is not None:
        kept.append(_kept_result(kind, frame, run))
    for result in run.results:
        config = result.expectation_config
        outcome.results.append({"expectation": config.type, "description": config.description,
                                "success": bool(result.success),
                                "unexpected": int(result.result.get("unexpected_count") or 0)})
        if result.success:
            outcome.passed += 1
            continue
        outcome.failed += 1
        if config.description == _PLAUSIBLE_DESCRIPTION:
            continue   # the row-level verdict is feeds.implausible's (same ranges, same rows)
        for index in result.result.get("unexpected_index_list") or []:
            outcome.bad_rows.setdefault(index, config.description)
    return outcome


# ---- keeping the full results for GX Data Docs (bonewatch.dashboard) -------------------------

_KEPT: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("bonewatch_kept_validations",
                                                                          default=None)
# Columns whose unexpected values could identify a patient (events' `value` holds birth dates):
# their value lists never leave this module.
_IDENTIFYING = {"patient_id", "result_id", "event_key", "collected_at", "collected_date", "occurred_at",
                "occurred_date", "detail"}
_ROW_LISTS = ("unexpected_list", "unexpected_index_list", "partial_unexpected_index_list",
              "unexpected_index_query", "unexpected_rows", "unexpected_index_column_names")


@contextmanager
def keep_results() -> Iterator[list[dict]]:
    """Collect the GX validation result of every `validate` call inside the block.

    Yields a list that fills with {"kind", "delivery_id", "result"} dicts, `result` being the GX
    validation result as JSON with its per-row lists removed (counts and up to 20 example values
    stay, never for identifying columns). Outside such a block nothing is kept.
    """
    kept: list[dict] = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def _kept_result(kind: str, frame: pd.DataFrame, run) -> dict:
    document = run.to_json_dict()
    for result in document.get("results", []):
        details = result.get("result") or {}
        for key in _ROW_LISTS:
            details.pop(key, None)
        column = ((result.get("expectation_config") or {}).get("kwargs") or {}).get("column")
        if column in _IDENTIFYING or (kind == "events" and column == "value"):
            details.pop("partial_unexpected_list", None)
            details.pop("partial_unexpected_counts", None)
    delivery = str(frame["delivery_id"].iloc[0]) if "delivery_id" in frame.columns and len(frame) else ""
    return {"kind": kind, "delivery_id": delivery, "result": document}
