"""Ingest on both stores: good rows kept, bad rows quarantined with reasons, the ledger skips a
file delivered twice, a correction replaces its original, and an unreadable file fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bonewatch import pipeline
from bonewatch.store.tables import clinical_events, deliveries, lab_results, quarantine

HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
GOOD_AND_BAD = HEADER + (
    "000123,r1,2160-0,0.9,mg/dL,2025-01-03T08:00:00,final\n"
    "000123,r2,9999-9,1.0,mg/dL,2025-01-03T08:00:00,final\n"            # an unmapped local code: skipped
    "000123,r3,2160-0,abc,mg/dL,2025-01-03T08:00:00,final\n"            # non-numeric value
    "000123,r4,2160-0,1.0,mg/dL,2025-02-30T08:00:00,final\n"            # impossible date
    "000123,r5,2160-0,1.0,U/L,2025-01-03T08:00:00,final\n"              # unconvertible unit
    "000123,r6,14682-9,79.56,µmol/L,2025-01-04T08:00:00+02:00,F\n"       # SI unit, offset, HL7 status
    "000123,r7,6768-6,<5,U/L,2025-01-04T08:00:00,final\n"               # censored, kept as censored
    "000123,r8,2160-0,1.0,mg/dL,2025-01-04T08:00:00,final,surplus\n"    # wrong field count
    "000123,r9,6768-6,3,ukat/L,2025-01-05T08:00:00,final\n"
    "000123,r10,718-7,13.1,g/dL,2025-01-05T08:00:00,final\n"            # haemoglobin: not monitored
    "000123,r11,,1.0,mg/dL,2025-01-05T08:00:00,final\n"                 # no code at all
)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def test_good_rows_kept_bad_rows_quarantined_with_reasons(engine, settings, tmp_path):
    summary = pipeline.ingest(settings, [write(tmp_path, "labs.csv", GOOD_AND_BAD)])
    assert (summary.accepted, summary.not_monitored, summary.quarantined, summary.failed_files) == (4, 2, 5, 0)
    with engine.connect() as conn:
        reasons = dict(conn.execute(select(quarantine.c.source_line, quarantine.c.reason)).all())
        rows = {r.result_id: r for r in conn.execute(select(lab_results))}
    assert reasons == {
        4: "unparseable value «abc»", 5: "impossible date «2025-02-30T08:00:00»",
        6: "unit «U/L» cannot be converted for creatinine", 9: "expected 7 fields, found 8", 12: "missing code"}
    assert rows["r6"].value == pytest.approx(0.9) and rows["r6"].orig_unit == "µmol/L"
    assert rows["r6"].orig_value == "79.56" and rows["r6"].status == "final"
    assert str(rows["r6"].collected_at).startswith("2025-01-04 06:00")   # +02:00 stored as UTC
    assert (rows["r7"].censor, rows["r7"].value) == ("<", 5.0)
    assert rows["r9"].value == pytest.approx(180.0) and rows["r9"].unit == "U/L"
    assert rows["r1"].patient_id == "000123"   # leading zeros kept


def test_same_file_twice_changes_nothing(engine, settings, tmp_path):
    path = write(tmp_path, "labs.csv", GOOD_AND_BAD)
    pipeline.ingest(settings, [path])
    before = [count(engine, t) for t in (lab_results, quarantine, deliveries)]
    again = pipeline.ingest(settings, [path])
    assert again.skipped_files == 1 and again.accepted == 0
    assert [count(engine, t) for t in (lab_results, quarantine, deliveries)] == before


def test_correction_replaces_and_late_original_does_not_undo_it(engine, settings, tmp_path):
    pipeline.ingest(settings, [write(tmp_path, "a.csv", HEADER + "1,r1,2160-0,2.0,mg/dL,2025-01-03,final\n")])
    pipeline.ingest(settings, [write(tmp_path, "b.csv", HEADER + "1,r1,2160-0,1.0,mg/dL,2025-01-03,corrected\n")])
    pipeline.ingest(settings, [write(tmp_path, "c.csv", HEADER + "1,r1,2160-0,2.0,mg/dL,2025-01-03,final\n\n")])
    with engine.connect() as conn:
        assert conn.execute(select(lab_results.c.value, lab_results.c.status)).one() == (1.0, "corrected")


def test_events_are_parsed_and_quarantined(engine, settings, tmp_path):
    text = ("patient_id,event_type,occurred_at,value,detail\n"
            "0042,birth_date,2020-01-01,1950-02-03,\n"
            "0042,sex,2020-01-01,female,\n"
            "0042,bisphosphonate_dose,2025-01-02,zoledronic_acid,4.0\n"
            "0042,weight_kg,2025-01-02,700,\n"          # implausible (GX expectation)
            "0042,teleport,2025-01-02,x,\n"             # unknown event type
            "0042,response,2025-01-02,great,\n")        # not an IMWG category
    summary = pipeline.ingest(settings, [write(tmp_path, "x.events.csv", text)])
    assert (summary.accepted, summary.quarantined) == (3, 3)
    with engine.connect() as conn:
        reasons = sorted(conn.execute(select(quarantine.c.reason)).scalars())
        sex = conn.execute(select(clinical_events.c.value).where(clinical_events.c.event_type == "sex")).scalar()
    assert sex == "F"
    assert reasons == ["implausible weight_kg value (outside 1-400)", "unknown event type «teleport»",
                       "unknown response value «great»"]


@pytest.mark.parametrize(("content", "line", "reason"), [
    (b"", None, "the file is empty"),
    (b"patient_id,value\n1,2\n", 1, "header lacks column(s) result_id, loinc, unit, collected_at, status"),
    (HEADER.encode() + b"1,r1,2160-0,1.0,mg/dL,2025-01-03,final\n1,r2,2160-0,1.0,mg/dL,2025-01-03,fin\xe9\xff\n", 3,
     "not UTF-8 text"),
])
def test_unreadable_file_fails_naming_file_and_line(engine, settings, tmp_path, content, line, reason):
    good = write(tmp_path, "good.csv", HEADER + "1,r1,2160-0,1.0,mg/dL,2025-01-03,final\n")
    bad = write(tmp_path, "bad.csv", content)
    summary = pipeline.ingest(settings, [bad, good])
    where = f"{bad}, line {line}" if line else str(bad)
    assert summary.errors == [f"cannot read {where}: {reason}"]
    assert summary.failed_files == 1 and summary.accepted == 1   # the other file still loads


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonewatch.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_prints_counts_and_one_line_errors(engine, settings, tmp_path):
    ok = run_cli("ingest", str(write(tmp_path, "labs.csv", GOOD_AND_BAD)))
    assert ok.returncode == 0, ok.stderr
    assert "labs.csv: 4 accepted, 2 not monitored, 5 quarantined" in ok.stdout
    assert "4 rows accepted, 2 not monitored, 5 quarantined" in ok.stdout
    bad = run_cli("ingest", str(write(tmp_path, "broken.csv", b"patient_id\n1\n")))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: cannot read {tmp_path / 'broken.csv'}, line 1: header lacks column(s) result_id, loinc, value, "
        "unit, collected_at, status"]
    # a missing path fails alone (issue 14): the file beside it loads, the exit code says a file failed
    missing = run_cli("ingest", str(write(tmp_path, "good.csv", HEADER + "1,r1,2160-0,1.0,mg/dL,2025-01-03,final\n")),
                      str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "good.csv: 1 accepted" in missing.stdout
    assert missing.stderr.strip().splitlines() == [f"error: cannot read {tmp_path / 'nope.csv'}: No such file or directory"]
    usage = run_cli("evaluate", "--as-of", "2025-02-30")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
