"""Bulk reads of history for the rule engine."""

from __future__ import annotations

from datetime import date

import pandas as pd
from sqlalchemy import Connection, select

from bonewatch.store.tables import clinical_events, lab_results

RULE_ANALYTES = ["creatinine", "alp", "bsap_activity", "bsap_mass", "calcium", "albumin", "ggt", "weight",
                 "urine_albumin_24h", "urine_albumin_spot"]


def load_history(conn: Connection, as_of: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Results and events collected on or before `as_of` (calendar day), as DataFrames."""
    r = lab_results.c
    labs = pd.read_sql(
        select(r.result_id, r.patient_id, r.analyte, r.value, r.censor, r.unit, r.collected_at,
               r.collected_date, r.status)
        .where(r.collected_date <= as_of, r.analyte.in_(RULE_ANALYTES)), conn)
    e = clinical_events.c
    events = pd.read_sql(
        select(e.event_key, e.patient_id, e.event_type, e.occurred_at, e.occurred_date, e.value, e.detail)
        .where(e.occurred_date <= as_of), conn)
    for frame, column in ((labs, "collected_at"), (events, "occurred_at")):
        frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
    # One string dtype everywhere (pandas infers it for derived frames too), so merges line up.
    for frame, text in ((labs, ["result_id", "patient_id", "analyte", "censor", "unit", "status"]),
                        (events, ["event_key", "patient_id", "event_type", "value", "detail"])):
        for column in text:
            frame[column] = frame[column].fillna("").astype("str")
    return labs, events
