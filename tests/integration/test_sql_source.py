"""The SQL source: lab rows pulled from a table in another (real PostgreSQL) database above a
high-water mark, so the second night reads only what is new; corrections replace, bad rows are
quarantined, an unreachable source is one plain line."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import psycopg
import pytest
from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.store.tables import deliveries, lab_results, quarantine, source_watermarks
from tests.conftest import throwaway_pg_database

pytestmark = pytest.mark.postgres

CONFIG = """
[sources.lis_db]
url_env = "BONEWATCH_LIS_URL"
table = "reporting.bone_labs"
watermark = "row_version"
batch_rows = 2
[sources.lis_db.columns]
patient_id = "mrn"
loinc = "loinc_code"
"""

SCHEMA = """
CREATE SCHEMA reporting;
CREATE TABLE reporting.bone_labs (
    row_version bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mrn text NOT NULL, result_id text NOT NULL, loinc_code text NOT NULL, value text,
    unit text, collected_at timestamp, status text
);
"""

INSERT = ("INSERT INTO reporting.bone_labs (mrn, result_id, loinc_code, value, unit, collected_at, status) "
          "VALUES (%s, %s, %s, %s, %s, %s, %s)")


@pytest.fixture
def lis(monkeypatch, tmp_path):
    """A throwaway PostgreSQL database standing in for the hospital's reporting database."""
    with throwaway_pg_database("bonewatch_lis") as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        config = tmp_path / "bonewatch.toml"
        config.write_text(CONFIG, encoding="utf-8")
        monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
        monkeypatch.setenv("BONEWATCH_LIS_URL", url.replace("postgresql://", "postgresql+psycopg://"))
        yield conn


def _results(engine) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(select(lab_results.c.result_id, lab_results.c.patient_id, lab_results.c.analyte,
                                   lab_results.c.value, lab_results.c.status)).all()
    return {r.result_id: (r.patient_id, r.analyte, round(r.value, 4), r.status) for r in rows}


def test_second_night_reads_only_new_rows(lis, engine):
    settings = load_settings()
    lis.cursor().executemany(INSERT, [
        ("000123", "R1", "2160-0", "0.9", "mg/dL", "2025-03-01 08:00:00", "final"),
        ("000123", "R2", "6768-6", "140", "U/L", "2025-03-01 08:00:00", "final"),
        ("000456", "R3", "CREA", "97", "umol/L", "2025-03-01 09:00:00", "F"),   # local code, SI unit
    ])
    first = pipeline.pull(settings, partition="2025-03-01")
    assert (first.files, first.accepted, first.quarantined, first.failed_files) == (1, 3, 0, 0)
    assert _results(engine) == {"R1": ("000123", "creatinine", 0.9, "final"),
                                "R2": ("000123", "alp", 140.0, "final"),
                                "R3": ("000456", "creatinine", round(97 / 88.4, 4), "final")}

    # Night two: a new result, a correction of R1, and a row the ingest must quarantine.
    lis.cursor().executemany(INSERT, [
        ("000123", "R4", "17861-6", "9.1", "mg/dL", "2025-03-02 08:00:00", "final"),
        ("000123", "R1", "2160-0", "1.1", "mg/dL", "2025-03-01 08:00:00", "corrected"),
        ("000456", "R5", "2160-0", "abc", "mg/dL", "2025-03-02 08:00:00", "final"),
    ])
    second = pipeline.pull(settings, partition="2025-03-02")
    assert (second.accepted, second.quarantined) == (2, 1)
    with engine.connect() as conn:
        ledger = conn.execute(select(deliveries.c.partition, deliveries.c.feed, deliveries.c.fmt,
                                     deliveries.c.rows_total).order_by(deliveries.c.partition)).all()
        mark = conn.execute(select(source_watermarks.c.watermark, source_watermarks.c.kind)).one()
        (reason,) = conn.execute(select(quarantine.c.reason)).scalars().all()
    # Only the three new rows were read on the second night: the first three were not read again.
    assert [tuple(r) for r in ledger] == [("2025-03-01", "lis_db", "sql", 3), ("2025-03-02", "lis_db", "sql", 3)]
    assert tuple(mark) == ("6", "int")
    assert "unparseable value «abc»" in reason
    results = _results(engine)
    assert results["R1"] == ("000123", "creatinine", 1.1, "corrected")
    assert set(results) == {"R1", "R2", "R3", "R4"}

    # The same night again: nothing new is read, nothing changes, no new ledger row.
    before = _results(engine)
    again = pipeline.pull(settings, partition="2025-03-02")
    assert (again.accepted, again.quarantined, again.failed_files) == (0, 0, 0)
    assert _results(engine) == before
    with engine.connect() as conn:
        assert conn.execute(select(deliveries.c.delivery_id)).scalars().all().__len__() == 2


def test_a_night_with_nothing_new_is_recorded_once(lis, engine):
    settings = load_settings()
    for _ in range(2):
        summary = pipeline.pull(settings, partition="2025-03-05")
        assert (summary.accepted, summary.failed_files) == (0, 0)
    with engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.feed, deliveries.c.rows_total, deliveries.c.status)).all()
    assert [tuple(r) for r in rows] == [("lis_db", 0, "loaded")]   # the feed arrived, empty


def test_unreachable_source_is_one_line_without_the_password(lis, engine, monkeypatch, tmp_path):
    monkeypatch.setenv("BONEWATCH_LIS_URL", "postgresql+psycopg://reader:s3cret@127.0.0.1:1/lab?connect_timeout=2")
    summary = pipeline.pull(load_settings(), partition="2025-03-01")
    assert summary.failed_files == 1
    (error,) = summary.errors
    assert "lis_db" in error and "s3cret" not in error and "\n" not in error
    with engine.connect() as conn:
        assert conn.execute(select(source_watermarks)).all() == []   # nothing read, mark unchanged

    cli = subprocess.run([sys.executable, "-m", "bonewatch.cli", "pull", "lis_db"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 1
    assert "Traceback" not in cli.stderr and "s3cret" not in cli.stderr
    assert cli.stderr.strip().startswith("error:") and "lis_db" in cli.stderr
    assert "1 source(s): 0 rows accepted" in cli.stdout


def test_unknown_source_name_is_bad_usage(lis, engine):
    cli = subprocess.run([sys.executable, "-m", "bonewatch.cli", "pull", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode != 0
    assert "no SQL source named 'nope'" in cli.stderr and "Traceback" not in cli.stderr


def test_nightly_pulls_the_sources_with_the_inbox(lis, engine, mailbox):
    lis.execute(INSERT, ("000123", "R1", "2160-0", "0.9", "mg/dL", "2025-03-01 08:00:00", "final"))
    result = pipeline.nightly(load_settings(), date(2025, 3, 1))
    assert result["ingest"]["accepted"] == 1
    assert json.dumps(result)  # the run summary stays JSON-safe
    assert set(_results(engine)) == {"R1"}
