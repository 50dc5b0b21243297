"""One synthetic cohort written as lab CSV, as HL7 v2 ORU, as FHIR R4 Bundles and as FHIR bulk
NDJSON gives the same store and the same alerts (issue: real hospital feeds)."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pandas as pd
import pytest
from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings
from bonewatch.ingest.parsing import public_reason
from bonewatch.store import tables

NIGHTS = 20
PATIENTS = 60


def _run(folder, monkeypatch, db_url: str):
    """Ingest the cohort night by night, evaluating each night; return (summaries, store)."""
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", db_url)
    settings = load_settings()
    engine = pipeline.engine_for(settings, migrate=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    summaries = [pipeline.ingest(settings, [folder / "history"])]
    night = date.fromisoformat(manifest["first_night"])
    while night <= date.fromisoformat(manifest["last_night"]):
        if (folder / "inbox" / night.isoformat()).is_dir():
            summaries.append(pipeline.ingest(settings, [folder / "inbox" / night.isoformat()],
                                             partition=night.isoformat()))
        pipeline.evaluate(settings, night)
        night += timedelta(days=1)
    with engine.connect() as conn:
        store = {name: pd.read_sql(select(table), conn) for name, table in
                 (("alerts", tables.alerts), ("labs", tables.lab_results), ("events", tables.clinical_events),
                  ("quarantine", tables.quarantine))}
    engine.dispose()
    return summaries, store


def _number_or_text(value: str):
    try:
        return round(float(value), 4)
    except ValueError:
        return value


def _projection(store: dict) -> dict:
    """The clinical content of a store, without what only names the source (result ids, delivery
    ids, line numbers, the value as sent)."""
    labs = store["labs"]
    lab_rows = sorted(zip(labs.patient_id, labs.analyte, labs.value.round(4), labs.censor, labs.unit,
                          labs.collected_at.astype(str), labs.collected_date.astype(str), labs.status, strict=True))
    events = store["events"]
    detail = [("" if kind == "myeloma_therapy_start" else _number_or_text(d))   # FHIR: "administration"
              for kind, d in zip(events.event_type, events.detail, strict=True)]
    event_rows = sorted(zip(events.patient_id, events.event_type, events.occurred_at.astype(str),
                            [_number_or_text(v) for v in events.value], detail, strict=True), key=str)
    alerts = store["alerts"]
    alert_rows = sorted(zip(alerts.alert_id, alerts.patient_id, alerts.rule, alerts.raised_on.astype(str),
                            alerts.status, alerts.evidence, strict=True))
    # the reason quotes the value as sent: an HL7 timestamp reads 20250230080000, not 2025-02-30T08:00:00
    reasons = sorted(public_reason(reason) for reason in store["quarantine"].reason)
    return {"labs": lab_rows, "events": event_rows, "alerts": alert_rows, "quarantine": reasons}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    for fmt in synth.FORMATS:
        synth.generate(root / fmt, patients=PATIENTS, seed=11, last_night=date(2025, 6, 30), nights=NIGHTS, fmt=fmt)
    return root


def test_the_generator_writes_each_format(cohorts):
    night = sorted(p.name for p in (cohorts / "csv" / "inbox").iterdir())[0]
    assert {p.name for p in (cohorts / "csv" / "history").iterdir()} == {"labs.csv", "events.csv"}
    assert {p.name for p in (cohorts / "hl7" / "history").iterdir()} == {"labs.hl7", "events.csv"}
    assert {p.name for p in (cohorts / "fhir" / "history").iterdir()} == {"bundle.json"}
    assert {p.suffix for p in (cohorts / "ndjson" / "history").iterdir()} == {".ndjson"}
    assert (cohorts / "hl7" / "history" / "labs.hl7").read_bytes().startswith(b"MSH|^~\\&|")
    assert json.loads((cohorts / "fhir" / "inbox" / night / "bundle.json").read_text())["resourceType"] == "Bundle"
    expected = {fmt: (cohorts / fmt / "expected_alerts.jsonl").read_text() for fmt in synth.FORMATS}
    assert len(set(expected.values())) == 1, "one cohort, whatever the format"


def test_four_formats_give_the_same_store_and_alerts(cohorts, monkeypatch, tmp_path):
    results = {fmt: _run(cohorts / fmt, monkeypatch, f"sqlite:///{tmp_path / fmt}.db") for fmt in synth.FORMATS}
    expected = {(a["patient_id"], a["rule"], a["raised_on"]) for a in
                map(json.loads, (cohorts / "csv" / "expected_alerts.jsonl").read_text().splitlines())}
    reference = _projection(results["csv"][1])
    assert {(p, r, d) for _, p, r, d, _, _ in reference["alerts"]} == expected, "the CSV run finds the planted alerts"
    assert len(reference["quarantine"]) > 0 and len(reference["labs"]) > 500
    for fmt, (summaries, store) in results.items():
        assert [e for s in summaries for e in s.errors] == [], fmt
        projection = _projection(store)
        for part in ("labs", "events", "quarantine", "alerts"):
            assert projection[part] == reference[part], f"{fmt}: {part} differ from the CSV run"


@pytest.mark.postgres
def test_ndjson_on_postgresql_gives_the_csv_alerts(cohorts, monkeypatch, tmp_path, pg_database):
    from tests.conftest import _reset_pg

    _reset_pg(pg_database)
    _, on_pg = _run(cohorts / "ndjson", monkeypatch, pg_database)
    _, on_sqlite = _run(cohorts / "csv", monkeypatch, f"sqlite:///{tmp_path / 'csv.db'}")
    assert _projection(on_pg)["alerts"] == _projection(on_sqlite)["alerts"]
    assert _projection(on_pg)["labs"] == _projection(on_sqlite)["labs"]
