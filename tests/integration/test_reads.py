"""History reads for the rule engine on both stores: the ADBC reader (`reads.History`, what
evaluation uses) returns exactly the frames of `reads.load_patients` (the SQLAlchemy path), with
the dtypes the rules expect, for awkward ids, empty batches and patients with half a history; and
a load committed while an evaluation runs leaves its patient dirty."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime

import pandas as pd
import pytest
from sqlalchemy import insert, make_url, select

from bonewatch import pipeline
from bonewatch.store import reads, writes
from bonewatch.store.tables import clinical_events, lab_results, patient_index

# a quote, a non-ASCII name, a JSON-looking id, an id that differs from another only in case
ODD = ["p'1 \"q\"", "Zoë-Ørsted-患者", '["x"]', "P2", "p2"]
ONLY_EVENTS, ONLY_LABS, NOTHING = "only-events", "only-labs", "nobody-at-all"


def _lab(pid: str, n: int, analyte: str = "creatinine", **over) -> dict:
    row = {"result_id": f"{pid}/{analyte}/{n}", "patient_id": pid, "analyte": analyte, "code": "X", "value": 1.25 + n,
           "censor": "", "unit": "mg/dL", "orig_value": "1.25", "orig_unit": "mg/dL",
           "collected_at": datetime(2024, 3, 1 + n, 8, 30, 15, 123456 if n % 2 else 0),
           "collected_date": date(2024, 3, 1 + n), "status": "final", "status_rank": 2, "delivery_id": "d",
           "source_line": n, "collected_basis": ""}
    return row | over


def _event(pid: str, n: int, event_type: str = "weight_kg", value: str = "70", detail: str = "") -> dict:
    return {"event_key": f"{pid}/{event_type}/{n}", "patient_id": pid, "event_type": event_type,
            "occurred_at": datetime(2024, 2, 1 + n, 9, 0, 0, 500 * n), "occurred_date": date(2024, 2, 1 + n),
            "value": value, "detail": detail, "delivery_id": "d", "source_line": n}


@pytest.fixture
def history_store(engine):
    labs = [_lab(pid, n) for pid in ODD for n in range(3)]
    labs += [_lab(ODD[0], 5, "alp", censor="<", value=20.0), _lab(ODD[1], 6, "calcium"),
             _lab(ODD[1], 7, "sodium"),           # not a rule analyte: never read
             _lab(ONLY_LABS, 1), _lab(ONLY_LABS, 2, "weight", unit="kg")]
    events = [_event(pid, n) for pid in ODD for n in range(2)]
    events += [_event(ONLY_EVENTS, 1, "birth_date", "1950-02-03"), _event(ONLY_EVENTS, 2, "sex", "F"),
               _event(ODD[2], 4, "bisphosphonate_dose", "zoledronic_acid", "4"), _event(ODD[3], 4, "note", "", "")]
    with engine.begin() as conn:
        conn.execute(insert(lab_results), labs)
        conn.execute(insert(clinical_events), events)
    return engine


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _check_dtypes(labs: pd.DataFrame, events: pd.DataFrame) -> None:
    for frame, columns in ((labs, reads.LAB_COLUMNS), (events, reads.EVENT_COLUMNS)):
        assert list(frame.columns) == list(columns)
        for name, kind in columns.items():
            expected = {"text": "str", "float": "float64", "instant": "datetime64[ns]", "day": "datetime64[ns]"}[kind]
            assert frame[name].dtype == expected, (name, frame[name].dtype)
            if kind == "text":
                assert not frame[name].isna().any(), name
            if kind == "day":
                assert (frame[name] == frame[name].dt.normalize()).all(), name


@pytest.mark.parametrize("ids", [ODD + [ONLY_EVENTS, ONLY_LABS, NOTHING], [ODD[1], ODD[1], ODD[4]], [ONLY_EVENTS],
                                 [ONLY_LABS], [NOTHING], []])
def test_adbc_reads_equal_the_sqlalchemy_reads(history_store, ids):
    with history_store.begin() as conn:
        expected_labs, expected_events = reads.load_patients(conn, ids)
    with reads.open_history(history_store) as history:
        labs, events = history.load(ids)
    _check_dtypes(labs, events)
    _check_dtypes(expected_labs, expected_events)
    pd.testing.assert_frame_equal(_sorted(labs, ["result_id"]), _sorted(expected_labs, ["result_id"]))
    pd.testing.assert_frame_equal(_sorted(events, ["patient_id", "event_type", "occurred_at"]),
                                  _sorted(expected_events, ["patient_id", "event_type", "occurred_at"]))
    wanted = set(ids)
    assert set(labs["patient_id"]) == wanted - {ONLY_EVENTS, NOTHING}
    assert set(events["patient_id"]) == wanted - {ONLY_LABS, NOTHING}
    assert "sodium" not in set(labs["analyte"])
    assert labs["result_id"].is_unique   # a repeated id reads its patient once


def test_adbc_reads_values_exactly(history_store):
    with reads.open_history(history_store) as history:
        labs, events = history.load([ODD[1], ODD[0]])
    first = labs.set_index("result_id").loc[f"{ODD[1]}/creatinine/1"]
    assert first["patient_id"] == ODD[1] and first["value"] == 2.25 and first["censor"] == ""
    assert first["collected_at"] == pd.Timestamp("2024-03-02 08:30:15.123456")
    assert first["collected_date"] == pd.Timestamp("2024-03-02")
    censored = labs.set_index("result_id").loc[f"{ODD[0]}/alp/5"]
    assert (censored["censor"], censored["value"]) == ("<", 20.0)
    weight = events[(events["patient_id"] == ODD[0]) & (events["occurred_date"] == pd.Timestamp("2024-02-02"))]
    assert weight["occurred_at"].tolist() == [pd.Timestamp("2024-02-02 09:00:00.000500")]
    assert weight["detail"].tolist() == [""]


def test_a_reader_sees_what_is_committed_after_it_opened(history_store):
    with reads.open_history(history_store) as history:
        before, _ = history.load([ONLY_LABS])
        with history_store.begin() as conn:
            conn.execute(insert(lab_results), [_lab(ONLY_LABS, 9)])
        after, _ = history.load([ONLY_LABS])
    assert len(after) == len(before) + 1


def test_another_process_sees_what_this_one_commits_after_a_read(history_store):
    """A reader opened and closed in this process leaves the store's locks whole: another process
    sees what this one commits next (a second copy of SQLite in the process, as
    adbc-driver-sqlite links, released the first one's locks when it closed, and it did not)."""
    with reads.open_history(history_store) as history:
        before, _ = history.load([ONLY_LABS])
    with history_store.begin() as conn:
        conn.execute(insert(lab_results), [_lab(ONLY_LABS, 9)])
    count = ("import sys; from sqlalchemy import text; from bonewatch.store import db; "
             "conn = db.make_engine(sys.argv[1]).connect(); "
             "print(conn.execute(text('SELECT count(*) FROM lab_results WHERE patient_id = :p'), {'p': sys.argv[2]}).scalar())")
    url = history_store.url.render_as_string(hide_password=False)
    done = subprocess.run([sys.executable, "-c", count, url, ONLY_LABS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(before) + 1


def test_a_load_committed_during_an_evaluation_leaves_its_patient_dirty(history_store, settings, monkeypatch):
    """The history is read on a connection of its own, after the evaluation took its list of
    patients: a delivery that lands in between is read or not, but its patient stays dirty, and
    the next evaluation reads it."""
    with history_store.begin() as conn:
        writes.mark_patients(conn, [ONLY_LABS], [date(2024, 3, 2)])
    loaded = []
    real_load = reads.History.load

    def load_with_a_delivery_landing(self, patient_ids):
        if not loaded:   # another process commits a result and marks the patient
            with history_store.begin() as conn:
                conn.execute(insert(lab_results), [_lab(ONLY_LABS, 9)])
                writes.mark_patients(conn, [ONLY_LABS], [date(2024, 3, 10)])
            loaded.append(True)
        return real_load(self, patient_ids)

    monkeypatch.setattr(reads.History, "load", load_with_a_delivery_landing)
    assert pipeline.evaluate(settings, date(2024, 4, 1)).patients == 1
    with history_store.connect() as conn:
        dirty = conn.execute(select(patient_index.c.dirty_from).where(patient_index.c.patient_id == ONLY_LABS)).scalar()
    assert dirty == date(2024, 3, 2)
    assert pipeline.evaluate(settings, date(2024, 4, 1)).patients == 1
    assert pipeline.evaluate(settings, date(2024, 4, 1)).patients == 0


def test_the_libpq_uri_keeps_what_libpq_needs():
    url = make_url("postgresql+psycopg://bw:p%40ss%2Fw:rd@db.example:5433/bone?sslmode=require")
    assert reads.libpq_uri(url) == "postgresql://bw:p%40ss%2Fw%3Ard@db.example:5433/bone?sslmode=require"
    assert reads.libpq_uri(make_url("postgresql+psycopg:///bone?host=/run/postgresql")) == \
        "postgresql:///bone?host=%2Frun%2Fpostgresql"
