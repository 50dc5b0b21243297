"""Great Expectations suites for the parsed feeds, built in code on an ephemeral context.

Parsing (ingest/) decides what a row *is* (code, number, unit, date); these suites decide whether
the parsed, canonical rows are *plausible*. Rows that an expectation flags are quarantined with the
expectation's description as the reason, so a GX failure is never silent.

Chain as in the GX 1.x docs: pandas data source -> dataframe asset -> whole-dataframe batch
definition; suite -> ValidationDefinition -> run(batch_parameters={"dataframe": df}).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import pandas as pd

from bonewatch.units import ANALYTES

log = logging.getLogger(__name__)

LAB_STATUSES = ["preliminary", "final", "corrected", "cancelled"]


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

    context = gx.get_context(mode="ephemeral")
    for name in list(logging.root.manager.loggerDict):  # GX sets its own levels on import
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
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
        for analyte, (low, high) in plausible_key:
            unit = ANALYTES[analyte].canonical_unit
            suite.add_expectation(E.ExpectColumnValuesToBeBetween(
                column="value", min_value=low, max_value=high,
                row_condition=f'analyte=="{analyte}"', condition_parser="pandas",
                description=f"implausible {analyte} value (outside {low:g}-{high:g} {unit})"))
    elif kind == "events":
        for column in ("patient_id", "event_type", "occurred_at"):
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(
                column=column, description=f"{column} is present"))
        ranges = dict(plausible_key)
        for event_type, analyte in (("weight_kg", "weight"), ("albuminuria_mg_24h", "urine_albumin_24h")):
            if analyte in ranges:
                low, high = ranges[analyte]
                suite.add_expectation(E.ExpectColumnValuesToBeBetween(
                    column="number", min_value=low, max_value=high,
                    row_condition=f'event_type=="{event_type}"', condition_parser="pandas",
                    description=f"implausible {event_type} value (outside {low:g}-{high:g})"))
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    return context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{kind}_validation", data=batch, suite=suite))


def validate(kind: str, frame: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> Validation:
    """Run the `kind` suite ("labs" or "events") on a parsed chunk; return flagged rows by index."""
    outcome = Validation()
    if frame.empty:
        return outcome
    key = tuple(sorted((a, tuple(r)) for a, r in plausible.items() if a in ANALYTES))
    definition = _validation_definition(kind, key)
    # A named index makes GX report {name: value} dicts; plain labels are easier to map back.
    run = definition.run(batch_parameters={"dataframe": frame.rename_axis(None)},
                         result_format={"result_format": "COMPLETE"})
    for result in run.results:
        config = result.expectation_config
        outcome.results.append({"expectation": config.type, "description": config.description,
                                "success": bool(result.success),
                                "unexpected": int(result.result.get("unexpected_count") or 0)})
        if result.success:
            outcome.passed += 1
            continue
        outcome.failed += 1
        for index in result.result.get("unexpected_index_list") or []:
            outcome.bad_rows.setdefault(index, config.description)
    return outcome
