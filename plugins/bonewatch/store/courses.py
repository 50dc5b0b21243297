"""The persisted course state machine (active -> held -> active, active -> discontinued): a
snapshot of every course as of the last evaluated night, rebuilt from history by the rules."""

from __future__ import annotations

from datetime import date

import pandas as pd
from sqlalchemy import Connection, delete, select

from bonewatch.store.tables import course_states
from bonewatch.store.writes import _insert


def save_course_states(conn: Connection, states: pd.DataFrame, as_of: date, patients: set[str] | None = None) -> None:
    """Replace the stored states of the evaluated patients (all patients when `patients` is None)."""
    if patients is None:
        conn.execute(delete(course_states))
    elif patients:
        ids = sorted(patients)
        for start in range(0, len(ids), 5000):
            conn.execute(delete(course_states).where(course_states.c.patient_id.in_(ids[start:start + 5000])))
    if states.empty:
        return
    rows = states.assign(as_of=as_of)
    rows["renal_baseline_date"] = [None if v is None or pd.isna(v) else date.fromisoformat(v)
                                   for v in rows["renal_baseline_date"]]
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    conn.execute(_insert(conn, course_states), records)


def courses_of(conn: Connection, patient_id: str) -> list[dict]:
    query = select(course_states).where(course_states.c.patient_id == patient_id).order_by(course_states.c.course_start)
    return [dict(r._mapping) for r in conn.execute(query)]
