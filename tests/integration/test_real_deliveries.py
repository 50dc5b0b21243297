"""Deliveries shaped as real systems send them (issue: real feeds), end to end on a synthetic cohort
whose ground truth is known:

- an HL7-only hospital: results, body weights (OBX 29463-7) and demographics (PID-7 / PID-8) come
  in ORU messages only, clinical events without birth date, sex or weight; it still gets every
  planted alert, the CrCl-based ones (DOSE_BAND) included;
- a FHIR history whose Patients carry no `meta.lastUpdated` (as servers often send them), loaded in
  one go and then evaluated night after night (a backfill), gives the same alerts as the same
  data delivered night by night, and both find what was planted: birth date and sex are timeless
  (SPEC 2.5), so no earlier night loses its age, sex, CrCl and DOSE_BAND.
"""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings
from bonewatch.ingest import hl7
from bonewatch.store import tables

NIGHTS = 20
PATIENTS = 60
LAST = date(2025, 6, 30)
DEMOGRAPHICS = ("birth_date", "sex")


def _rows(path: Path) -> list[tuple]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader)
        return [tuple(row) for row in reader]


def _write_csv(path: Path, header: tuple, rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _hl7_only(source: Path, target: Path) -> None:
    """The CSV cohort as an HL7-only hospital sends it: every delivery's results and weights in
    ORU messages whose PID carries the patient's birth date and sex, and the other clinical
    events (doses, diagnoses...) without demographics or weights."""
    events = [row for path in sorted(source.rglob("events.csv")) for row in _rows(path)]
    births = {r[0]: r[3] for r in events if r[1] == "birth_date"}
    sexes = {r[0]: r[3] for r in events if r[1] == "sex"}
    demographics = {p: (births.get(p, ""), sexes.get(p, "")) for p in births.keys() | sexes.keys()}
    for folder in sorted({p.parent for p in source.rglob("*.csv")}):
        out = target / folder.relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        labs = _rows(folder / "labs.csv") if (folder / "labs.csv").exists() else []
        rest = _rows(folder / "events.csv") if (folder / "events.csv").exists() else []
        weights = [(p, f"W-{p}-{at}", "29463-7", value, "kg", at if "T" in at else f"{at}T00:00:00", "final")
                   for p, kind, at, value, _ in rest if kind == "weight_kg"]
        if labs or weights:
            hl7.write_hl7(out / "labs.hl7", labs + weights, demographics=demographics)
        kept = [r for r in rest if r[1] not in (*DEMOGRAPHICS, "weight_kg")]
        _write_csv(out / "events.csv", synth.EVENT_HEADER, kept)
    (target / "manifest.json").write_text((source / "manifest.json").read_text())


def _strip_patient_stamps(folder: Path) -> int:
    """Take `meta.lastUpdated` and the recorded-at extension off every Patient of every Bundle."""
    stripped = 0
    for path in folder.rglob("bundle.json"):
        bundle = json.loads(path.read_text("utf-8"))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient" and ("meta" in resource or "extension" in resource):
                resource.pop("meta", None)
                resource.pop("extension", None)
                stripped += 1
        path.write_text(json.dumps(bundle), "utf-8")
    return stripped


def _nights(manifest: dict) -> list[date]:
    first, last = date.fromisoformat(manifest["first_night"]), date.fromisoformat(manifest["last_night"])
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _alerts(settings) -> list[tuple]:
    engine = pipeline.engine_for(settings)
    with engine.connect() as conn:
        rows = conn.execute(select(tables.alerts.c.patient_id, tables.alerts.c.rule, tables.alerts.c.raised_on,
                                   tables.alerts.c.evidence, tables.alerts.c.status)).all()
    engine.dispose()
    return sorted((p, r, str(d), e, s) for p, r, d, e, s in rows)


def _settings(monkeypatch, url: str):
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", url)
    settings = load_settings()
    pipeline.engine_for(settings, migrate=True).dispose()
    return settings


def run_night_by_night(folder: Path, settings) -> list[tuple]:
    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = pipeline.ingest(settings, [folder / "history"])
    assert loaded.errors == [] and loaded.accepted > 0
    for night in _nights(manifest):
        if (folder / "inbox" / night.isoformat()).is_dir():
            pipeline.ingest(settings, [folder / "inbox" / night.isoformat()], partition=night.isoformat())
        pipeline.evaluate(settings, night)
    return _alerts(settings)


def run_in_one_go(folder: Path, settings) -> list[tuple]:
    """The whole history and every night's files loaded first, then each night evaluated (a backfill)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = pipeline.ingest(settings, [folder / "history", folder / "inbox"])
    assert loaded.errors == [] and loaded.accepted > 0
    for night in _nights(manifest):
        pipeline.evaluate(settings, night)
    return _alerts(settings)


def planted(folder: Path) -> set[tuple]:
    return {(a["patient_id"], a["rule"], a["raised_on"]) for a in
            map(json.loads, (folder / "expected_alerts.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_deliveries")
    for fmt in ("csv", "fhir"):
        synth.generate(root / fmt, patients=PATIENTS, seed=11, last_night=LAST, nights=NIGHTS, fmt=fmt)
    _hl7_only(root / "csv", root / "hl7_only")
    return root


def test_an_hl7_only_hospital_gets_the_crcl_alerts(cohorts, monkeypatch, tmp_path):
    folder = cohorts / "hl7_only"
    assert not [r for p in folder.rglob("events.csv") for r in _rows(p) if r[1] in (*DEMOGRAPHICS, "weight_kg")]
    alerts = run_night_by_night(folder, _settings(monkeypatch, f"sqlite:///{tmp_path / 'hl7.db'}"))
    found = {(p, r, d) for p, r, d, _, _ in alerts}
    expected = planted(cohorts / "csv")
    assert any(rule == "DOSE_BAND" for _, rule, _ in expected), "the cohort plants CrCl-based alerts"
    assert found == expected
    dose_band = [json.loads(e) for _, rule, _, e, _ in alerts if rule == "DOSE_BAND"]
    assert all(e.get("crcl") or e.get("latest_crcl") or "CrCl" in json.dumps(e) for e in dose_band)


def test_a_fhir_history_in_one_go_gives_the_alerts_of_its_nights(cohorts, monkeypatch, tmp_path):
    folder = cohorts / "fhir"
    assert _strip_patient_stamps(folder) > 0
    night_by_night = run_night_by_night(folder, _settings(monkeypatch, f"sqlite:///{tmp_path / 'nights.db'}"))
    one_go = run_in_one_go(folder, _settings(monkeypatch, f"sqlite:///{tmp_path / 'one_go.db'}"))
    assert {(p, r, d) for p, r, d, _, _ in night_by_night} == planted(cohorts / "csv")
    assert [a[:4] for a in one_go] == [a[:4] for a in night_by_night], "evidence included"


def test_a_result_timed_by_its_report_says_so_in_the_alert(engine, settings, tmp_path):
    """A creatinine inside a DiagnosticReport without effective[x] of its own (as many servers
    send them) is stored at the report's time, and the RENAL_HOLD it raises says whose time it is."""
    subject = {"reference": "urn:uuid:p1"}

    def creatinine(rid: str, value: float, **timing) -> dict:
        return {"resourceType": "Observation", "id": rid, "status": "final", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
                "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                  "code": "mg/dL"}, **timing}

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "p1", "gender": "female",
                                                "birthDate": "1950-02-03",
                                                "identifier": [{"value": "000777"}]}},
        {"fullUrl": "urn:uuid:o1", "resource": creatinine("o1", 0.9, effectiveDateTime="2025-01-02T08:00:00Z")},
        {"fullUrl": "urn:uuid:m1", "resource": {
            "resourceType": "MedicationAdministration", "status": "completed", "subject": subject,
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                      "code": "77655"}]},
            "effectiveDateTime": "2025-01-05T10:00:00Z", "dosage": {"dose": {"value": 4, "unit": "mg"}}}},
        {"fullUrl": "urn:uuid:r1", "resource": {
            "resourceType": "DiagnosticReport", "id": "r1", "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "24362-6"}]},
            "effectiveDateTime": "2025-02-01T07:30:00Z", "result": [{"reference": "urn:uuid:o2"}]}},
        {"fullUrl": "urn:uuid:o2", "resource": creatinine("o2", 1.6)},
    ]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(bundle), "utf-8")
    loaded = pipeline.ingest(settings, [path])
    assert (loaded.accepted, loaded.quarantined) == (5, 0)      # 2 results, a dose, birth date, sex
    with engine.connect() as conn:
        stored = dict(conn.execute(select(tables.lab_results.c.result_id, tables.lab_results.c.collected_basis)).all())
    assert stored == {"o1": "", "o2": "DiagnosticReport.effective"}
    pipeline.evaluate(settings, date(2025, 2, 2))
    (evidence,) = [json.loads(e) for _, rule, _, e, _ in _alerts(settings) if rule == "RENAL_HOLD"]
    assert evidence["time_basis"] == ["the creatinine of 2025-02-01 had no collection time of its own: the "
                                      "effective time of the DiagnosticReport that lists it is used"]
