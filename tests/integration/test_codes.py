"""Not monitored is not bad (SPEC 2.5): results of analytes bonewatch does not use are counted per
code and skipped, unmapped local codes are listed for the data team until mapped or ignored, and
birth date and sex are timeless facts, one per patient, the latest delivery's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.ingest import codes as code_list
from bonewatch.store.tables import clinical_events, deliveries, lab_results, patient_index, quarantine

HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
# A real night's panel: a CBC and a metabolic panel around the monitored analytes.
PANEL = HEADER + (
    "000777,c1,718-7,13.2,g/dL,2025-03-01T08:00:00,final\n"          # haemoglobin: not monitored
    "000777,c2,6690-2,6.1,10*3/uL,2025-03-01T08:00:00,final\n"       # leukocytes: not monitored
    "000777,c3,2951-2,139,mmol/L,2025-03-01T08:00:00,final\n"        # sodium: not monitored
    "000777,c4,2160-0,1.1,mg/dL,2025-03-01T08:00:00,final\n"         # creatinine: stored
    "000777,c5,CRE-X,97,umol/L,2025-03-01T08:00:00,final\n"          # a local creatinine, not mapped yet
    "000777,c6,CRE-X,99,umol/L,2025-03-02T08:00:00,final\n"
    "000777,c7,GLU-POC,5.4,mmol/L,2025-03-02T08:00:00,final\n"       # a local glucose the hospital ignores
    "000777,c8,718-7,,g/dL,2025-03-02T08:00:00,final\n"              # not monitored: no value needed
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def with_config(tmp_path: Path, monkeypatch, toml: str):
    config = tmp_path / "bonewatch.toml"
    config.write_text(toml, encoding="utf-8")
    monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
    return load_settings()


def test_panels_are_counted_not_quarantined(engine, settings, tmp_path):
    summary = pipeline.ingest(settings, [write(tmp_path, "panel.csv", PANEL)])
    assert (summary.accepted, summary.not_monitored, summary.quarantined) == (1, 7, 0)
    assert summary.per_file == [{"file": "panel.csv", "accepted": 1, "not_monitored": 7, "quarantined": 0}]
    with engine.connect() as conn:
        assert conn.execute(select(quarantine)).all() == []
        assert conn.execute(select(lab_results.c.result_id)).scalars().all() == ["c4"]
        ledger = conn.execute(select(deliveries.c.rows_total, deliveries.c.rows_accepted,
                                     deliveries.c.rows_quarantined, deliveries.c.rows_not_monitored)).one()
        listed = code_list.load(conn, settings, everything=True)
        unmapped = code_list.load(conn, settings)
    assert tuple(ledger) == (8, 1, 0, 7)
    by_code = {r.code: r for r in listed.itertuples(index=False)}
    assert {c: (r.status, r.rows) for c, r in by_code.items()} == {
        "CRE-X": ("unmapped", 2), "GLU-POC": ("unmapped", 1), "718-7": ("not_monitored", 2),
        "6690-2": ("not_monitored", 1), "2951-2": ("not_monitored", 1)}
    assert (str(by_code["CRE-X"].first_collected), str(by_code["CRE-X"].last_collected)) == ("2025-03-01", "2025-03-02")
    assert list(unmapped["code"]) == ["CRE-X", "GLU-POC"]        # the data team's list, most rows first


def test_an_unmapped_code_is_listed_until_mapped_or_ignored(engine, settings, tmp_path, monkeypatch):
    pipeline.ingest(settings, [write(tmp_path, "panel.csv", PANEL)])
    url = settings.database_url
    ignoring = with_config(tmp_path, monkeypatch, f'[database]\nurl = "{url}"\n[ingest]\nignore_codes = ["GLU-POC"]\n')
    with engine.connect() as conn:
        assert list(code_list.load(conn, ignoring)["code"]) == ["CRE-X"]
    mapped = with_config(tmp_path, monkeypatch, f'[database]\nurl = "{url}"\n[ingest]\nignore_codes = ["GLU-POC"]\n'
                                                '[ingest.code_map]\n"CRE-X" = "14682-9"\n')
    with engine.connect() as conn:
        assert code_list.load(conn, mapped).empty
        everything = code_list.load(conn, mapped, everything=True).set_index("code")
    assert (everything.loc["CRE-X", "status"], everything.loc["CRE-X", "analyte"]) == ("mapped", "creatinine")
    assert everything.loc["GLU-POC", "status"] == "ignored"
    # once mapped, the code's results are stored, converted
    later = HEADER + "000777,c9,CRE-X,106.08,umol/L,2025-03-03T08:00:00,final\n"
    summary = pipeline.ingest(mapped, [write(tmp_path, "later.csv", later)])
    assert (summary.accepted, summary.not_monitored) == (1, 0)
    with engine.connect() as conn:
        value = conn.execute(select(lab_results.c.value).where(lab_results.c.result_id == "c9")).scalar()
    assert abs(value - 1.2) < 1e-9


def test_malformed_and_missing_codes_are_quarantined_without_quoting_them(engine, settings, tmp_path):
    text = HEADER + ("000777,m1,DOE JOHN,1.0,mg/dL,2025-03-01T08:00:00,final\n"
                     "000777,m2,,1.0,mg/dL,2025-03-01T08:00:00,final\n")
    summary = pipeline.ingest(settings, [write(tmp_path, "odd.csv", text)])
    assert (summary.accepted, summary.not_monitored, summary.quarantined) == (0, 0, 2)
    with engine.connect() as conn:
        reasons = sorted(conn.execute(select(quarantine.c.reason)).scalars())
    assert reasons == ["malformed code (not shaped like a code)", "missing code"]
    assert not any("DOE" in r for r in reasons)


def test_cli_codes_lists_the_unmapped_codes(engine, settings, tmp_path):
    pipeline.ingest(settings, [write(tmp_path, "panel.csv", PANEL)])
    run = subprocess.run([sys.executable, "-m", "bonewatch.cli", "codes"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "CRE-X" in run.stdout and "GLU-POC" in run.stdout and "718-7" not in run.stdout
    every = subprocess.run([sys.executable, "-m", "bonewatch.cli", "codes", "--all", "--format", "json"],
                           capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in every.stdout.splitlines()]
    assert {r["code"]: r["status"] for r in rows}["718-7"] == "not_monitored"
    assert {r["code"]: r["rows"] for r in rows}["CRE-X"] == 2


EVENTS = "patient_id,event_type,occurred_at,value,detail\n"


def _demographics(engine) -> list[tuple]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(clinical_events.c.patient_id, clinical_events.c.event_type,
                                          clinical_events.c.value)
                                   .where(clinical_events.c.event_type.in_(["birth_date", "sex"]))).all())


def _dirty_from(engine, patient: str):
    with engine.connect() as conn:
        return conn.execute(select(patient_index.c.dirty_from).where(patient_index.c.patient_id == patient)).scalar()


def test_demographics_are_one_fact_per_patient_the_latest_delivery_wins(engine, settings, tmp_path):
    pipeline.ingest(settings, [write(tmp_path, "a.events.csv", EVENTS + "0042,birth_date,2025-06-01,1950-02-03,\n"
                                     "0042,sex,2025-06-01,F,\n0042,weight_kg,2025-01-02,70,\n")])
    assert _demographics(engine) == [("0042", "birth_date", "1950-02-03"), ("0042", "sex", "F")]
    # a new birth date marks the patient from the earliest day: every night, a past one too, sees it
    assert str(_dirty_from(engine, "0042")) == "1900-01-01"
    # a later delivery corrects the birth date for every night, even one recorded "earlier"
    pipeline.ingest(settings, [write(tmp_path, "b.events.csv", EVENTS + "0042,birth_date,2024-01-01,1950-03-02,\n")])
    assert _demographics(engine) == [("0042", "birth_date", "1950-03-02"), ("0042", "sex", "F")]
    # within one delivery, the latest recorded wins
    pipeline.ingest(settings, [write(tmp_path, "c.events.csv", EVENTS + "0042,sex,2025-07-02,M,\n"
                                     "0042,sex,2025-07-01,F,\n")])
    assert _demographics(engine) == [("0042", "birth_date", "1950-03-02"), ("0042", "sex", "M")]


def test_a_resent_identical_fact_marks_nobody(engine, settings, tmp_path):
    pipeline.ingest(settings, [write(tmp_path, "a.events.csv", EVENTS + "0042,birth_date,2025-06-01,1950-02-03,\n")])
    with engine.begin() as conn:
        conn.execute(patient_index.update().values(dirty_from=None))
    pipeline.ingest(settings, [write(tmp_path, "b.events.csv", EVENTS + "0042,birth_date,2025-06-09,1950-02-03,\n")])
    assert _dirty_from(engine, "0042") is None
    assert _demographics(engine) == [("0042", "birth_date", "1950-02-03")]


def test_a_file_with_nothing_bonewatch_reads_says_so(engine, settings, tmp_path):
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Encounter", "id": "e1", "status": "finished"}},
        {"resource": {"resourceType": "Practitioner", "id": "dr"}}]}
    path = tmp_path / "encounters.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    summary = pipeline.ingest(settings, [path])
    assert summary.failed_files == 0
    assert summary.per_file == [{"file": "encounters.json", "accepted": 0, "not_monitored": 0, "quarantined": 0,
                                 "note": pipeline.NOTHING_READ}]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**bundle, "id": "second"}), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "bonewatch.cli", "ingest", str(other)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and f"other.json: {pipeline.NOTHING_READ}" in run.stdout
