"""The carried history (store/state.py, issue 16) on both stores: a patient's carried rows plus
the store's rows from its `dirty_from` on are its whole history, row for row and dtype for dtype,
after new results, a late result, a correction that moves a result to another day and new events;
the carried rows are what a night reads; and the whole history is read again when the state
cannot be trusted (a changed birth date, another rule set, a full evaluation)."""

from __future__ import annotations

from datetime import date

import pandas as pd
from sqlalchemy import func, select, update

from bonewatch import incremental, pipeline
from bonewatch.store import reads
from bonewatch.store import state as patient_state
from bonewatch.store.tables import lab_results, patient_index
from tests.integration.test_state_equality import _load

EVENTS = [("S1", "birth_date", "2025-01-01", "1950-02-03", ""), ("S1", "sex", "2025-01-01", "F", ""),
          ("S1", "diagnosis", "2024-01-05", "MM", "C90.00"), ("S1", "weight_kg", "2024-12-20", "70.0", ""),
          ("S1", "bisphosphonate_dose", "2025-01-02T14:00:00+00:00", "zoledronic_acid", "4.0"),
          ("S2", "diagnosis", "2024-01-05", "MM", "C90.00")]
LABS = [("S1", "a1", "2160-0", "0.90", "mg/dL", "2024-12-30T08:00:00+00:00", "final"),
        ("S1", "a2", "6768-6", "150", "U/L", "2025-01-20T08:00:00+00:00", "final"),
        ("S1", "a3", "2160-0", "1.00", "mg/dL", "2025-02-10T08:00:00+00:00", "final"),
        ("S2", "b1", "2160-0", "1.10", "mg/dL", "2025-02-11T08:00:00+00:00", "final")]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


def _both(engine, settings, ids=("S1", "S2"), *, full=False) -> tuple[pd.DataFrame, ...]:
    digest = incremental.rules_digest(settings)
    with engine.begin() as conn:
        *carried, _ = patient_state.load(conn, list(ids), digest, full=full)
        whole = reads.load_patients(conn, list(ids))
    return tuple(_sorted(f) for f in (*carried, *whole))


def _deliver(engine, settings, labs=(), events=(), name="d") -> None:
    _load(engine, settings, ([(*r,) for r in labs], [(*e,) for e in events]), name)


def test_carried_rows_plus_the_window_are_the_whole_history(settings, engine):
    _deliver(engine, settings, LABS, EVENTS, "d0")
    pipeline.evaluate(settings, date(2025, 3, 1))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(patient_state.patient_state)).scalar() == 2
    # a night's result, a late result (before the evaluated night), a result moved by its
    # correction from before the window into it, a new event
    _deliver(engine, settings, [
        ("S1", "a4", "2160-0", "1.20", "mg/dL", "2025-03-02T08:00:00+00:00", "final"),
        ("S1", "a5", "17861-6", "8.1", "mg/dL", "2025-02-20T08:00:00+00:00", "final"),
        ("S1", "a2", "6768-6", "180", "U/L", "2025-02-25T08:00:00+00:00", "corrected"),
    ], [("S1", "weight_kg", "2025-03-02", "69.0", "")], "d1")
    labs, events, whole_labs, whole_events = _both(engine, settings)
    pd.testing.assert_frame_equal(labs, whole_labs)
    pd.testing.assert_frame_equal(events, whole_events)
    assert set(labs["result_id"]) == {"a1", "a2", "a3", "a4", "a5", "b1"}
    assert labs.loc[labs["result_id"] == "a2", "value"].tolist() == [180.0]

    # evaluated again: the new state carries them, and nothing is dirty
    pipeline.evaluate(settings, date(2025, 3, 2))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(patient_index)
                            .where(patient_index.c.dirty_from.is_not(None))).scalar() == 0
    labs, events, whole_labs, whole_events = _both(engine, settings)
    pd.testing.assert_frame_equal(labs, whole_labs)
    pd.testing.assert_frame_equal(events, whole_events)


def test_a_night_reads_the_carried_rows_and_the_whole_history_when_they_cannot_be_trusted(settings, engine):
    _deliver(engine, settings, LABS, EVENTS, "d0")
    pipeline.evaluate(settings, date(2025, 3, 1))
    # behind the index's back (no load marks it): a carried result changes in the store
    with engine.begin() as conn:
        conn.execute(update(lab_results).where(lab_results.c.result_id == "a1").values(value=5.0))
    labs, _, whole_labs, _ = _both(engine, settings)
    assert labs.loc[labs["result_id"] == "a1", "value"].tolist() == [0.9]        # carried
    assert whole_labs.loc[whole_labs["result_id"] == "a1", "value"].tolist() == [5.0]

    labs, _, whole_labs, _ = _both(engine, settings, full=True)                     # a full evaluation
    pd.testing.assert_frame_equal(labs, whole_labs)
    labs, *_ = _both(engine, settings.model_copy(update={"rules": {}}))             # another rule set
    assert labs.loc[labs["result_id"] == "a1", "value"].tolist() == [5.0]

    # a new birth date marks S1 from 1900: its whole history is read, S2's is still carried
    with engine.begin() as conn:
        conn.execute(update(lab_results).where(lab_results.c.result_id == "b1").values(value=6.0))
    _deliver(engine, settings, events=[("S1", "birth_date", "2025-03-01", "1951-02-03", "")], name="d1")
    labs, _, whole_labs, _ = _both(engine, settings)
    assert labs.loc[labs["result_id"] == "a1", "value"].tolist() == [5.0]
    assert labs.loc[labs["result_id"] == "b1", "value"].tolist() == [1.1]


def test_a_correction_that_moves_a_result_to_another_patient_leaves_its_first_owner_s_carried_rows(settings, engine):
    # The same result id, corrected under another patient (a misidentified specimen): the first
    # owner's carried copy must not outlive it, nor its findings.
    _deliver(engine, settings, LABS, EVENTS, "d0")
    pipeline.evaluate(settings, date(2025, 3, 1))
    _deliver(engine, settings, [("S2", "a3", "2160-0", "1.00", "mg/dL", "2025-02-10T08:00:00+00:00", "corrected")],
             name="d1")
    with engine.connect() as conn:
        dirty = dict(conn.execute(select(patient_index.c.patient_id, patient_index.c.dirty_from)).tuples().all())
    assert dirty["S1"] == date(2025, 2, 10)      # the first owner is marked from the moved row's day
    labs, events, whole_labs, whole_events = _both(engine, settings)
    pd.testing.assert_frame_equal(labs, whole_labs)
    pd.testing.assert_frame_equal(events, whole_events)
    assert labs.loc[labs["result_id"] == "a3", "patient_id"].tolist() == ["S2"]
    pipeline.evaluate(settings, date(2025, 3, 2))
    labs, events, whole_labs, whole_events = _both(engine, settings)
    pd.testing.assert_frame_equal(labs, whole_labs)
