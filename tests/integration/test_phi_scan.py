"""PHI scan: names, MRNs and birth dates planted in every field of every feed format go nowhere
but the clinical channel.

One module-scoped run on a tiny synthetic cohort (SQLite, the session's SMTP catcher): the last
night's inbox also holds planted files (canonical labs CSV, events CSV, HL7 v2, a FHIR Bundle and
FHIR NDJSON, written with the package's own writers plus hand-made messages for the fields the
writers do not fill: PID-5 name, MSH-9, MSH-12, a FHIR Patient's name). The night runs through
ingest, evaluate, the quality check and notify with every log record captured at DEBUG; then the
dashboard and its Data Docs are built and the CLI meets a failure.

Channels and what each may carry:
- operational (zero hits of any planted token, and none of the cohort's patient ids): logs, the
  data team's emails (data-quality and failure emails), the dashboard's files (HTML, JSON, JS),
  the GX Data Docs, CLI error output.
- the nurses' PHI-minimal digest (`[site] phi_minimal`): the patient's id (MRN) by design, never
  a name or a birth date.
- clinical (not scanned, they exist to show patient data): the normal nurse digest, `bonewatch
  quarantine` (reasons with the values they quote), `bonewatch alerts`, `bonewatch codes`.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings, with_overrides
from bonewatch.dashboard import build
from bonewatch.ingest import feeds, fhir, hl7
from bonewatch.notify.render import render_digest
from bonewatch.store import db
from bonewatch.store.tables import alerts, quarantine

NAME = "ZZPHINAME"
MRN = "99887766"
BAD_BIRTH = "1950-02-30"
BIRTH = "1947-11-23"
TOKENS = [NAME, f"MRN {MRN}", MRN, f"{NAME}^JOHN", BAD_BIRTH, BIRTH]
#: what must not appear (case-insensitive; HL7 spells dates without dashes)
NEEDLES = [NAME, MRN, BAD_BIRTH, BIRTH, BAD_BIRTH.replace("-", ""), BIRTH.replace("-", "")]
LAST = date(2025, 6, 30)
DATA_TEAM = "clinical-data-team@hospital.example"


def hits(text: str, needles: list[str] = NEEDLES) -> list[str]:
    low = text.lower()
    return [n for n in needles if n.lower() in low]


def _lab_rows(pid: str, stamp: str) -> list[tuple]:
    """A creatinine row per (field, token): the token in that field, the others valid."""
    rows = []
    for column in range(len(feeds.LAB_COLUMNS)):
        for k, token in enumerate(TOKENS):
            row = [pid, f"PHI-{column}-{k}", "2160-0", "1.1", "mg/dL", stamp, "final"]
            row[column] = token
            rows.append(tuple(row))
    return rows


def _event_rows(pid: str, day: str) -> list[tuple]:
    rows = []
    for token in TOKENS:
        for event_type in sorted(feeds.EVENT_TYPES):
            rows.append((pid, event_type, day, token, ""))
        rows += [(pid, token, day, "F", ""), (pid, "sex", token, "F", ""), (token, "sex", day, "F", ""),
                 (pid, "bisphosphonate_dose", day, "zoledronic_acid", token), (pid, "diagnosis", day, "MM", token)]
    return rows


def _hl7_by_hand(pid: str) -> str:
    """Messages whose PID-5 (name), PID-7, PID-8, MSH-9 and MSH-12 carry the tokens."""
    obx = "OBX|1|NM|2160-0^^LN||1.1|mg/dL|||||F|||20250630080000"
    out = []
    for i, token in enumerate(TOKENS):
        t = token.replace("^", "/")
        out += [f"MSH|^~\\&|LIS|H|BW|H|20250630||ORU^R01|a{i}|P|2.5.1\rPID|1||{pid}^^^H^MR||{NAME}^JOHN||"
                f"{t.replace('-', '')}|{t}\rOBR|1||PHI-H{i}|2160-0^^LN\r{obx}\rNTE|1||{t} called",
                f"MSH|^~\\&|LIS|H|BW|H|20250630||{t}|b{i}|P|2.5.1\rPID|1||{pid}^^^H^MR\r{obx}",
                f"MSH|^~\\&|LIS|H|BW|H|20250630||ORU^R01|c{i}|P|{t}\rPID|1||{pid}^^^H^MR\r{obx}"]
    return "\n".join(out) + "\n"


def _fhir_by_hand(pid: str) -> dict:
    """A Bundle whose Patient has a name and birth dates, an Observation and a Condition with text only."""
    patient = {"resourceType": "Patient", "id": "pz", "identifier": [{"system": fhir.MRN_SYSTEM, "value": pid}],
               "name": [{"family": NAME, "given": ["JOHN"], "text": f"{NAME} JOHN"}], "birthDate": BAD_BIRTH,
               "gender": NAME}
    entries = [patient]
    for i, token in enumerate(TOKENS):
        entries += [
            {"resourceType": "Observation", "id": f"oz{i}", "status": token, "subject": {"reference": "Patient/pz"},
             "code": {"coding": [{"system": "http://loinc.org", "code": token}], "text": token},
             "valueQuantity": {"value": 1.1, "unit": token}, "effectiveDateTime": token,
             "note": [{"text": token}]},
            {"resourceType": "Condition", "id": f"cz{i}", "subject": {"reference": "Patient/pz"},
             "code": {"text": token}, "note": [{"text": token}]},
            {"resourceType": "Observation", "id": f"ox{i}", "status": "final", "subject": {"reference": "Patient/pz"},
             "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
             "valueString": token, "effectiveDateTime": "2025-06-30T08:00:00"},
        ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        # aiosmtpd ("mail.log") is the test's SMTP server, standing in for the hospital's: it logs
        # every DATA line it receives, and the digests it receives are the clinical channel
        if not record.name.startswith("mail.log"):
            self.lines.append(f"{record.name} {record.levelname} {self.format(record)}")


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, smtp_server):
    """The whole run; returns what each channel produced."""
    folder = tmp_path_factory.mktemp("phi")
    cohort = folder / "cohort"
    manifest = synth.generate(cohort, patients=6, seed=3, last_night=LAST, nights=14)
    pids = sorted(json.loads((cohort / "manifest.json").read_text())["patient_scenarios"])
    env = {"BONEWATCH_DATA_DIR": str(folder / "data"), "BONEWATCH_DATABASE_URL": f"sqlite:///{folder / 'store.db'}",
           "BONEWATCH_SMTP_HOST": "127.0.0.1", "BONEWATCH_SMTP_PORT": str(smtp_server.port),
           "BONEWATCH_SMTP_STARTTLS": "false"}
    settings = with_overrides(load_settings(env=env), site__inbox=str(cohort / "inbox"))
    engine = db.make_engine(settings.database_url)
    db.upgrade(engine)

    pid, stamp = pids[0], "2025-06-30T08:00:00"
    night = cohort / "inbox" / LAST.isoformat()
    night.mkdir(parents=True, exist_ok=True)
    labs, events = _lab_rows(pid, stamp), _event_rows(pid, LAST.isoformat())
    synth._write_csv(night / "planted.csv", synth.LAB_HEADER, labs)
    synth._write_csv(night / "planted.events.csv", synth.EVENT_HEADER, events)
    hl7.write_hl7(night / "planted.hl7", labs, demographics={pid: (BAD_BIRTH, NAME)})
    (night / "hand.hl7").write_text(_hl7_by_hand(pid), "utf-8")
    fhir.write_bundle(night / "planted.json", labs, events)
    (night / "hand.json").write_text(json.dumps(_fhir_by_hand(pid)), "utf-8")
    ndjson = folder / "ndjson"
    fhir.write_ndjson(ndjson, labs, events)
    for path in ndjson.glob("*.ndjson"):
        path.rename(night / f"planted-{path.name}")

    records = _Records()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    smtp_server.clear()
    try:
        pipeline.ingest(settings, [cohort / "history"] + sorted(p for p in (cohort / "inbox").iterdir() if p != night))
        for day in sorted({json.loads(line)["raised_on"] for line in
                           (cohort / "expected_alerts.jsonl").read_text().splitlines()}):
            if day < LAST.isoformat():
                pipeline.evaluate(settings, date.fromisoformat(day))
        result = pipeline.nightly(settings, LAST, now=datetime(2025, 7, 1, 1, 30, tzinfo=UTC))
        out = folder / "dashboard"
        build.build(engine, settings, out, now=datetime(2025, 7, 1, 7, 0, tzinfo=UTC))
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(alerts)).mappings()]
            reasons = [r for (r,) in conn.execute(select(quarantine.c.reason))]
        minimal = with_overrides(settings, site__phi_minimal=True)
        digest = render_digest("nurses@hospital.example", LAST, rows, minimal,
                               links={r["alert_id"]: f"http://ack/{r['alert_id']}" for r in rows})
    finally:
        root.removeHandler(records)
        root.setLevel(previous)
    messages = list(smtp_server.messages)
    envelopes = list(smtp_server.envelopes)
    engine.dispose()
    return {"settings": settings, "env": env, "pids": pids, "logs": records.lines, "result": result,
            "messages": list(zip(messages, envelopes, strict=True)), "dashboard": out, "alerts": rows,
            "reasons": reasons, "minimal": digest, "manifest": manifest}


def _text(message) -> str:
    parts = [str(message["Subject"])]
    for part in message.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


def test_the_planted_feeds_were_read_quarantined_and_alerted_on(scanned):
    """The scan means something only if the tokens went in: rows quarantined with the tokens
    quoted (for the command line), alerts raised, digests and a data-quality email sent."""
    assert scanned["result"]["ingest"]["failed_files"] == 0, scanned["result"]["ingest"]["errors"]
    assert scanned["result"]["ingest"]["quarantined"] > 50
    assert any(NAME in r for r in scanned["reasons"]) and any(MRN in r for r in scanned["reasons"])
    assert scanned["alerts"]
    recipients = {tuple(rcpts) for _, (_, rcpts) in scanned["messages"]}
    assert (DATA_TEAM,) in recipients and len(recipients) >= 2


def test_no_phi_in_the_logs(scanned):
    assert len(scanned["logs"]) > 10
    bad = [line for line in scanned["logs"] if hits(line, NEEDLES + scanned["pids"])]
    assert bad == [], bad[:5]


def test_no_phi_in_the_data_team_emails(scanned):
    for message, (_, rcpts) in scanned["messages"]:
        if rcpts == [DATA_TEAM]:
            assert hits(_text(message), NEEDLES + scanned["pids"]) == [], message["Subject"]


def test_the_phi_minimal_digest_names_no_name_and_no_birth_date(scanned):
    digest = scanned["minimal"]
    assert hits(digest.text + digest.html) == []
    assert any(pid in digest.text for pid in scanned["pids"])      # the MRN is what it carries


def test_no_phi_on_the_dashboard_or_in_the_data_docs(scanned):
    out: Path = scanned["dashboard"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "quarantine.html").exists() and (out / "codes.html").exists()
    assert any("datadocs" in p.parts for p in files), "the Data Docs were built"
    found = {str(p.relative_to(out)): hits(p.read_bytes().decode("utf-8", "replace"), NEEDLES + scanned["pids"])
             for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    assert "«…»" in (out / "quarantine.html").read_text("utf-8")


def test_no_phi_in_cli_errors(scanned, monkeypatch):
    from tests.integration.alerting import run_cli

    for name, value in scanned["env"].items():
        monkeypatch.setenv(name, value)

    def broken(*args, **kwargs):
        raise RuntimeError(f"(sqlite3.IntegrityError) UNIQUE failed [parameters: ('{NAME}', '{MRN}', '{BIRTH}')]")

    monkeypatch.setattr(pipeline, "engine_for", broken)
    for args in (["alerts"], ["quarantine"], ["codes"], ["ingest", str(scanned["dashboard"])]):
        done = run_cli(*args)
        assert done.returncode != 0 and hits(done.stderr) == [], (args, done.stderr)


def test_the_clinical_channel_still_reads_the_values(scanned, monkeypatch):
    """`bonewatch quarantine` is where the values the dashboard withholds are read."""
    from tests.integration.alerting import run_cli

    for name, value in scanned["env"].items():
        monkeypatch.setenv(name, value)
    done = run_cli("quarantine", "--limit", "5000", "--format", "json")
    assert done.returncode == 0, done.stderr
    reasons = [json.loads(line)["reason"] for line in done.stdout.splitlines()]
    assert any(NAME in r for r in reasons)
    assert not any(re.search(r"birth date.*(1950|1947)", r) for r in reasons)
