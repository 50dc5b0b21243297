"""`bonewatch alerts --format fhir`: every alert as a FHIR R4 `DetectedIssue` that the
`fhir.resources` R4 models (the R4B subpackage) validate: all the alerts a synthetic cohort
raises, and alerts in every lifecycle status on both stores."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from fhir.resources.R4B.detectedissue import DetectedIssue

from bonewatch import pipeline, synth
from bonewatch.config import load_settings
from bonewatch.export import detected_issue, detected_issue_lines
from bonewatch.store import alerts as store_alerts
from bonewatch.store import db
from tests.integration.alerting import alert_row, insert_alerts, run_cli

R4_SEVERITY = {"high", "moderate", "low"}                      # DetectedIssue.severity, required binding
R4_STATUS = {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
             "unknown"}                                        # ObservationStatus


def _check(line: str, alert: dict) -> None:
    """The line validates as an R4 DetectedIssue and says what the alert says."""
    resource = json.loads(line)
    issue = DetectedIssue.model_validate(resource)             # raises on anything R4 rejects
    assert issue.get_resource_type() == "DetectedIssue" and issue.id == alert["alert_id"]
    assert issue.status in R4_STATUS and issue.severity in R4_SEVERITY
    assert issue.identifier[0].value == alert["alert_id"]
    assert issue.code.coding[0].code == alert["rule"]
    assert issue.patient.identifier.value == alert["patient_id"]
    assert issue.patient.identifier.type.coding[0].code == "MR"
    extensions = {e.url.rsplit(":", 1)[1]: e for e in issue.extension}
    assert extensions["rule-version"].valueString == alert["rule_version"]
    assert extensions["recommended-action"].valueString == alert["action"]
    assert extensions["alert-status"].valueCode == alert["status"]
    assert json.loads(extensions["evidence"].valueString) == json.loads(json.dumps(alert["evidence"], default=str))
    if alert["status"] == "resolved":
        assert str(issue.identifiedPeriod.start) == str(alert["raised_on"])
        assert str(issue.identifiedPeriod.end) == str(alert["resolved_on"])
    else:
        assert str(issue.identifiedDateTime) == str(alert["raised_on"])
    if alert["acknowledged_by"]:
        assert issue.mitigation[0].author.display == alert["acknowledged_by"]
    assert detected_issue(alert) == resource


@pytest.fixture(scope="module")
def cohort_alerts(tmp_path_factory) -> list[dict]:
    """The alerts a synthetic cohort raises over its nights (built once, on a SQLite store)."""
    folder = tmp_path_factory.mktemp("cohort")
    feeds = folder / "feeds"
    manifest = synth.generate(feeds, patients=30, seed=5, last_night=date(2025, 6, 30), nights=14)
    settings = load_settings(env={"BONEWATCH_DATA_DIR": str(folder / "data"),
                                  "BONEWATCH_DATABASE_URL": f"sqlite:///{folder / 'store.db'}"})
    engine = db.make_engine(settings.database_url)
    db.upgrade(engine)
    # The nightly deliveries in one labs and one events file: the same rows, two ingests instead
    # of two a night (the plausibility suite runs once per file).
    merged = folder / "merged"
    merged.mkdir()
    for suffix in ("labs.csv", "events.csv"):
        files = sorted((feeds / "inbox").rglob(f"*{suffix}"))
        lines = [files[0].read_text("utf-8").splitlines()[0]]
        for path in files:
            lines += path.read_text("utf-8").splitlines()[1:]
        (merged / ("nights.events.csv" if suffix == "events.csv" else "nights.csv")).write_text(
            "\n".join(lines) + "\n", "utf-8")
    pipeline.ingest(settings, [feeds / "history", merged])
    # the nights the generator planted a finding on, and the last night (where some have resolved)
    planted = {json.loads(line)["raised_on"] for line in (feeds / "expected_alerts.jsonl").read_text().splitlines()}
    for night in sorted(planted | {manifest["last_night"]}):
        pipeline.evaluate(settings, date.fromisoformat(night))
    with engine.connect() as conn:
        rows = store_alerts.list_alerts(conn)
    engine.dispose()
    return rows


def test_every_alert_of_the_synthetic_cohort_is_a_valid_detected_issue(cohort_alerts):
    assert len(cohort_alerts) >= 10
    assert len({a["rule"] for a in cohort_alerts}) >= 4
    lines = list(detected_issue_lines(cohort_alerts))
    assert len(lines) == len(cohort_alerts)
    for line, alert in zip(lines, cohort_alerts, strict=True):
        _check(line, alert)


def test_cli_exports_alerts_in_every_status(engine):
    night = date(2025, 6, 5)
    rows = [alert_row("000123", "RENAL_HOLD", "high", evidence={"summary": "SCr up", "scr": {"value_mg_dl": 1.4}}),
            alert_row("000123", "REVIEW_1Y", "medium", status="notified"),
            alert_row("000456", "ALP_RISE_BORTEZOMIB", "info"),
            alert_row("000789", "DOSE_BAND", "high", status="resolved")]
    rows[3]["resolved_on"] = night + timedelta(days=3)
    insert_alerts(engine, *rows)
    with engine.begin() as conn:
        store_alerts.acknowledge(conn, rows[2]["alert_id"], "R. Nurse", datetime.now(UTC).replace(tzinfo=None))

    done = run_cli("alerts", "--format", "fhir")
    assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        alerts = {a["alert_id"]: a for a in store_alerts.list_alerts(conn)}
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        _check(line, alerts[json.loads(line)["id"]])
    statuses = {json.loads(line)["id"]: json.loads(line) for line in lines}
    assert {r["severity"] for r in statuses.values()} == {"high", "moderate", "low"}
    assert "identifiedPeriod" in statuses[rows[3]["alert_id"]]
    assert statuses[rows[2]["alert_id"]]["mitigation"][0]["action"]["coding"][0]["code"] == "acknowledged"
