"""The bulk write path (`store/writes.py`) on both stores: what it stores is what SQLAlchemy reads
back, value for value (SQLite: in SQLAlchemy's own text format), and a staged chunk never
outlives its statement: not in the next chunk, not after a rollback, not as a file left in the
temp folder (issue 16 tried staging SQLite chunks through ADBC in a scratch file; see bench/README)."""

from __future__ import annotations

from datetime import date, datetime

import pandas as pd
import pytest
from sqlalchemy import DateTime, func, select, text

from bonewatch.store import writes
from bonewatch.store.tables import clinical_events, lab_results

LONG = "ü" * 60 + "x" * 4        # 64 characters, 124 bytes: the column's full width, non-ASCII

STAMPS = [datetime(2024, 3, 5, 7, 8, 9, 123456),    # microseconds
          datetime(2024, 3, 5, 0, 0, 0),             # midnight: no fraction at all
          datetime(1969, 12, 31, 23, 59, 59, 1),     # before the epoch
          datetime(2000, 2, 29, 12, 30, 0, 500000)]


def lab_rows(ids: list[str], rank: int = 2, status: str = "final") -> pd.DataFrame:
    n = len(ids)
    stamps = [STAMPS[i % len(STAMPS)] for i in range(n)]
    return pd.DataFrame({
        "result_id": ids, "patient_id": [f"MRN-{i % 2}" for i in range(n)], "analyte": "creatinine",
        "code": "2160-0", "value": [0.5 + i for i in range(n)], "censor": ["<" if i % 2 else "" for i in range(n)],
        "unit": "umol/L", "orig_value": [LONG if i == 0 else f"<{i}" for i in range(n)], "orig_unit": "µmol/L",
        "collected_at": stamps, "collected_date": [pd.Timestamp(s.date()) for s in stamps],
        "status": status, "status_rank": rank, "delivery_id": "d-1", "source_line": range(1, n + 1),
        "collected_basis": ""})


def event_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "event_key": ["k1", "k2"], "patient_id": ["MRN-0", "MRN-1"], "event_type": ["dose", "weight"],
        "occurred_at": [STAMPS[0], STAMPS[2]], "occurred_date": [pd.Timestamp("2024-03-05"), pd.Timestamp("1969-12-31")],
        "value": ["zoledronic acid 4 mg", ""], "detail": ["é" * 256, ""], "delivery_id": "d-1", "source_line": [1, 2]})


def test_bulk_writes_store_exactly_what_is_read_back(engine):
    labs = lab_rows(["r1", "r2", "r3", "r4"])
    with engine.begin() as conn:
        writes.upsert_results(conn, labs)
        writes.insert_events(conn, event_rows())
    with engine.connect() as conn:
        stored = conn.execute(select(lab_results).order_by(lab_results.c.result_id)).mappings().all()
        events = conn.execute(select(clinical_events).order_by(clinical_events.c.event_key)).mappings().all()
    assert [r["collected_at"] for r in stored] == STAMPS
    assert [r["collected_date"] for r in stored] == [s.date() for s in STAMPS]
    assert [r["orig_value"] for r in stored] == [LONG, "<1", "<2", "<3"]
    assert [r["censor"] for r in stored] == ["", "<", "", "<"]
    assert [r["value"] for r in stored] == [0.5, 1.5, 2.5, 3.5]
    assert [r["source_line"] for r in stored] == [1, 2, 3, 4]
    assert {r["orig_unit"] for r in stored} == {"µmol/L"}
    assert [(e["occurred_at"], e["occurred_date"], e["value"], e["detail"]) for e in events] == [
        (STAMPS[0], date(2024, 3, 5), "zoledronic acid 4 mg", "é" * 256), (STAMPS[2], date(1969, 12, 31), "", "")]
    if engine.dialect.name == "sqlite":
        # other code (and other tools) read the text: it must be SQLAlchemy's format exactly
        render = engine.dialect.type_descriptor(DateTime()).bind_processor(engine.dialect)
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT collected_at, collected_date FROM lab_results ORDER BY result_id")).all()
        assert [r[0] for r in raw] == [render(s) for s in STAMPS]
        assert raw[0][0] == "2024-03-05 07:08:09.123456" and raw[1][0] == "2024-03-05 00:00:00.000000"
        assert [r[1] for r in raw] == [s.date().isoformat() for s in STAMPS]


def test_a_staged_chunk_never_outlives_its_statement(engine, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with engine.begin() as conn:
        writes.upsert_results(conn, lab_rows(["a1", "a2", "a3"]))
        writes.upsert_results(conn, lab_rows(["b1"]))              # a smaller chunk after a larger one
        writes.upsert_results(conn, lab_rows(["a2"], rank=1, status="preliminary"))   # outranked: ignored
    with pytest.raises(RuntimeError), engine.begin() as conn:      # a load that fails mid-file
        writes.upsert_results(conn, lab_rows(["c1", "c2"]))
        raise RuntimeError("killed")
    with engine.begin() as conn:                                   # the next load sees only its own rows
        writes.upsert_results(conn, lab_rows(["d1"], rank=3, status="corrected"))
    with engine.connect() as conn:
        stored = dict(conn.execute(select(lab_results.c.result_id, lab_results.c.status)).tuples().all())
        marked = conn.execute(select(func.count()).select_from(text("patient_index"))).scalar()
    assert stored == {"a1": "final", "a2": "final", "a3": "final", "b1": "final", "d1": "corrected"}
    assert marked == 2                                             # MRN-0 and MRN-1
    assert list(scratch.iterdir()) == []

