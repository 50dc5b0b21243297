"""The notification shell against a real SMTP server (aiosmtpd) and both stores: one digest per
recipient per night, urgent first; the outbox marks alerts notified only after the server
accepted; an outage or a refusal delays, never loses or duplicates."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from bonewatch.config import Settings, load_settings
from bonewatch.errors import AlertDeliveryError
from bonewatch.model import alert_id
from bonewatch.notify.charts import Series as ChartSeries
from bonewatch.notify.charts import Trend
from bonewatch.notify.outbox import (
    backoff,
    flush,
    load_trend_frames,
    message_id_for,
    message_id_for_key,
    queue_digests,
    queue_message,
    recipients_for,
)
from bonewatch.notify.render import DISCLAIMER, render_digest
from bonewatch.notify.send import send_message
from bonewatch.store.tables import alerts, outbox
from tests.integration.alerting import audit_rows as _audit
from tests.integration.alerting import ingest, write_feeds

NIGHT = date(2025, 6, 5)
NURSES = "oncology-nurses@hospital.example"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# Read at import: the autouse clean_env fixture removes every BONEWATCH_* variable before a test.
REGEN_GOLDEN = os.environ.get("BONEWATCH_REGEN_GOLDEN") == "1"

RENAL_SUMMARY = ("SCr 1.40 mg/dL on 2025-06-05 is 0.50 above the renal baseline 0.90 mg/dL "
                 "(2025-04-01)")


# ---- helpers --------------------------------------------------------------------------------

def _alert(patient_id: str, rule: str, severity: str, *, evidence: dict | None = None,
           episode: str = "2025-06-05", status: str = "open", observed_on: date = NIGHT) -> dict:
    """An alerts-table row as the evaluate step would write it."""
    return {
        "alert_id": alert_id(patient_id, rule, episode),
        "patient_id": patient_id,
        "rule": rule,
        "rule_version": "1",
        "severity": severity,
        "episode": episode,
        "observed_on": observed_on,
        "raised_on": observed_on,
        "last_seen_on": observed_on,
        "resolved_on": None,
        "action": ACTIONS[rule],
        "citation": CITATIONS[rule],
        "evidence": json.dumps(evidence or {}),
        "status": status,
        "notified_at": None,
        "acknowledged_by": None,
        "acknowledged_at": None,
    }


ACTIONS = {
    "RENAL_HOLD": "Hold the bisphosphonate. Recheck serum creatinine before the next dose.",
    "REVIEW_1Y": "1-year bisphosphonate review: consider stopping if CR/VGPR (or sCR) and no "
                 "active bone disease; otherwise continue.",
    "ALP_RISE_BORTEZOMIB": "Informational: ALP rose with bortezomib, a sign of osteoblastic "
                           "activation. No change needed for this alone.",
    "DENTAL_EXAM_MISSING": "Dental examination before bisphosphonate or denosumab therapy.",
}
CITATIONS = {
    "RENAL_HOLD": "Zoledronic acid label (US PI 2.2; EU SmPC 4.2 for the 1.4 mg/dL cut-off)",
    "REVIEW_1Y": "IMWG 2021 bone-disease update",
    "ALP_RISE_BORTEZOMIB": "Zangari M et al., Am J Hematol 2007",
    "DENTAL_EXAM_MISSING": "Seed guideline summary, 'Monitoring requirements'",
}


def _cohort() -> list[dict]:
    """Three patients: one with info only, one with an urgent and a review alert, one review."""
    return [
        _alert("000777", "ALP_RISE_BORTEZOMIB", "info", evidence={
            "summary": "ALP 170 U/L on 2025-05-20 (day 40) is 30.8% above the ALP baseline "
                       "130 U/L (2025-04-10)",
            "values": [{"analyte": "alp", "value": 170.0, "unit": "U/L", "date": "2025-05-20"}],
        }),
        _alert("000123", "REVIEW_1Y", "medium", evidence={
            "summary": "Zoledronic acid course started 2024-06-05: 12 months today",
            "response": {"value": "VGPR", "date": "2025-05-01"},
            "bone_disease": {"value": "none", "date": "2025-05-01"},
        }),
        _alert("000123", "RENAL_HOLD", "high", evidence={
            "summary": RENAL_SUMMARY,
            "values": [{"analyte": "creatinine", "value": 1.4, "unit": "mg/dL",
                        "date": "2025-06-05"}],
            "baseline": {"value": 0.9, "unit": "mg/dL", "date": "2025-04-01",
                         "chosen_by": "last SCr within 30 days before the first dose"},
            "missing": [],
        }),
        _alert("000456", "DENTAL_EXAM_MISSING", "medium", evidence={
            "summary": "First denosumab dose 2025-06-03 with no dental examination since "
                       "2024-12-03",
        }),
    ]


def _insert(engine, *rows: dict) -> None:
    with engine.begin() as conn:
        conn.execute(insert(alerts), list(rows))


def _config(*, recipients: list[str] | None = None, phi_minimal: bool | None = None) -> Settings:
    """Settings reloaded after `mailbox` set BONEWATCH_SMTP_*, with optional overrides."""
    cfg = load_settings()
    if recipients is not None:
        cfg = cfg.model_copy(update={
            "recipients": cfg.recipients.model_copy(update={"default": recipients})})
    if phi_minimal is not None:
        cfg = cfg.model_copy(update={"site": cfg.site.model_copy(
            update={"phi_minimal": phi_minimal, "ack_base_url": "https://bonewatch.hospital.example"})})
    return cfg


def _outbox_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(outbox).order_by(outbox.c.recipient, outbox.c.night)).mappings()]


def _alert_rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["alert_id"]: dict(r) for r in conn.execute(select(alerts)).mappings()}


def _parts(message) -> tuple[str, str]:
    return (message.get_body(("plain",)).get_content(),
            message.get_body(("html",)).get_content())


def _closed_port() -> int:
    """A localhost port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- one digest a recipient a night ----------------------------------------------------------

def test_one_digest_per_recipient_grouped_urgent_first(engine, mailbox):
    cfg = _config()
    rows = _cohort()
    _insert(engine, *rows)

    assert queue_digests(engine, cfg, NIGHT) == 1
    result = flush(engine, cfg)

    assert (result.sent, result.failed, result.alerts_notified) == (1, 0, 4)
    assert len(mailbox.messages) == 1
    message = mailbox.messages[0]
    assert mailbox.envelopes[0] == (cfg.smtp.sender, [NURSES])
    assert message["To"] == NURSES
    assert message["Subject"] == ("bonewatch: 4 alerts for 3 patients, 1 urgent \N{EM DASH} "
                                  "night of 2025-06-05")
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Message-ID"] == message_id_for(NURSES, NIGHT)
    assert re.fullmatch(r"<bonewatch\.digest\.2025-06-05\.[0-9a-f]{12}@bonewatch>",
                        message["Message-ID"])

    text, html = _parts(message)
    for part in (text, html):
        # urgent patient first, then the review-only patient, then information only
        assert part.index("MRN 000123") < part.index("MRN 000456") < part.index("MRN 000777")
        # inside a patient: by severity
        assert part.index("RENAL_HOLD") < part.index("REVIEW_1Y")
        assert DISCLAIMER in part
        assert "0.90 mg/dL (2025-04-01)" in part
        assert CITATIONS["RENAL_HOLD"].split(" (")[0] in part
    renal = next(r for r in rows if r["rule"] == "RENAL_HOLD")
    assert f"bonewatch ack {renal['alert_id']} --by <your name>" in text
    assert f"bonewatch ack {renal['alert_id']} --by &lt;your name&gt;" in html
    assert "RENAL_HOLD v1" in text and "URGENT (high)" in text
    assert text.index("URGENT") < text.index("Do:") < text.index("Why:") < text.index("Ack:")
    assert "<img" not in html and "http" not in html  # nothing loads from outside

    box = _outbox_rows(engine)
    assert len(box) == 1
    assert box[0]["status"] == "sent" and box[0]["attempts"] == 1 and box[0]["sent_at"]
    assert box[0]["message_id"] == message["Message-ID"]
    assert sorted(json.loads(box[0]["alert_ids"])) == sorted(r["alert_id"] for r in rows)
    states = _alert_rows(engine)
    assert {a["status"] for a in states.values()} == {"notified"}
    assert all(a["notified_at"] is not None for a in states.values())


def test_rerun_sends_nothing_more(engine, mailbox):
    cfg = _config()
    _insert(engine, *_cohort())
    queue_digests(engine, cfg, NIGHT)
    flush(engine, cfg)
    notified_at = {k: a["notified_at"] for k, a in _alert_rows(engine).items()}

    assert queue_digests(engine, cfg, NIGHT) == 0
    again = flush(engine, cfg)
    assert queue_digests(engine, cfg, date(2025, 6, 6)) == 0     # the next night, nothing new
    assert (again.sent, again.failed, again.alerts_notified) == (0, 0, 0)
    assert flush(engine, cfg).sent == 0
    assert len(mailbox.messages) == 1
    assert len(_outbox_rows(engine)) == 1
    assert {k: a["notified_at"] for k, a in _alert_rows(engine).items()} == notified_at


def test_next_night_digest_holds_only_the_new_alert(engine, mailbox):
    cfg = _config()
    _insert(engine, *_cohort())
    queue_digests(engine, cfg, NIGHT)
    flush(engine, cfg)

    later = _alert("000999", "RENAL_HOLD", "high", observed_on=date(2025, 6, 6),
                   evidence={"summary": "SCr 2.60 mg/dL on 2025-06-06 is 1.10 above the renal "
                                        "baseline 1.50 mg/dL (2025-05-01)"})
    _insert(engine, later)
    assert queue_digests(engine, cfg, date(2025, 6, 6)) == 1
    assert flush(engine, cfg).sent == 1

    assert len(mailbox.messages) == 2
    second = mailbox.messages[1]
    assert second["Message-ID"] == message_id_for(NURSES, date(2025, 6, 6))
    assert second["Message-ID"] != mailbox.messages[0]["Message-ID"]
    text, _ = _parts(second)
    assert "MRN 000999" in text and "MRN 000123" not in text
    assert second["Subject"].startswith("bonewatch: 1 alert for 1 patient, 1 urgent")


def test_reopened_alert_reaches_the_nurses_again(engine, mailbox):
    """evaluate reopens a resolved alert under the same id (status open, notified_at cleared)."""
    cfg = _config()
    row = _cohort()[2]
    _insert(engine, row)
    queue_digests(engine, cfg, NIGHT)
    flush(engine, cfg)
    with engine.begin() as conn:
        conn.execute(update(alerts).values(status="open", notified_at=None))

    assert queue_digests(engine, cfg, date(2025, 6, 9)) == 1
    result = flush(engine, cfg)
    assert (result.sent, result.alerts_notified) == (1, 1)
    assert [m["Message-ID"] for m in mailbox.messages] == [
        message_id_for(NURSES, NIGHT), message_id_for(NURSES, date(2025, 6, 9))]


def test_alerts_found_later_the_same_night_extend_the_pending_digest(engine, mailbox):
    cfg = _config()
    first, *rest = _cohort()
    _insert(engine, first)
    assert queue_digests(engine, cfg, NIGHT) == 1
    _insert(engine, *rest)
    assert queue_digests(engine, cfg, NIGHT) == 1          # extended, not a second row
    box = _outbox_rows(engine)
    assert len(box) == 1 and len(json.loads(box[0]["alert_ids"])) == 4
    assert "4 alerts for 3 patients" in box[0]["subject"]

    assert flush(engine, cfg).sent == 1
    assert len(mailbox.messages) == 1

    # After that night's digest went out, a late alert for the same night gets a follow-up.
    late = _alert("000888", "DENTAL_EXAM_MISSING", "medium",
                  evidence={"summary": "First zoledronic acid dose 2025-06-05, no dental exam"})
    _insert(engine, late)
    assert queue_digests(engine, cfg, NIGHT) == 1
    assert flush(engine, cfg).sent == 1
    assert mailbox.messages[1]["Message-ID"] == message_id_for(NURSES, NIGHT, seq=2)
    assert "MRN 000888" in _parts(mailbox.messages[1])[0]


def test_flush_renders_current_evidence_and_skips_acknowledged(engine, mailbox):
    cfg = _config()
    rows = _cohort()
    _insert(engine, *rows)
    queue_digests(engine, cfg, NIGHT)
    renal, info = (next(r for r in rows if r["rule"] == rule)
                   for rule in ("RENAL_HOLD", "ALP_RISE_BORTEZOMIB"))
    with engine.begin() as conn:
        conn.execute(update(alerts).where(alerts.c.alert_id == renal["alert_id"]).values(
            evidence=json.dumps({"summary": "SCr 1.60 mg/dL on 2025-06-05 (corrected result)"})))
        conn.execute(update(alerts).where(alerts.c.alert_id == info["alert_id"]).values(
            status="acknowledged", acknowledged_by="R. Nurse"))

    result = flush(engine, cfg)
    assert (result.sent, result.alerts_notified) == (1, 3)
    text, _ = _parts(mailbox.messages[0])
    assert "SCr 1.60 mg/dL on 2025-06-05 (corrected result)" in text
    assert RENAL_SUMMARY not in text
    assert "MRN 000777" not in text
    assert mailbox.messages[0]["Subject"].startswith("bonewatch: 3 alerts for 2 patients")
    assert _alert_rows(engine)[info["alert_id"]]["status"] == "acknowledged"


def test_digest_with_nothing_left_to_say_is_cancelled_not_sent(engine, mailbox):
    cfg = _config()
    row = _cohort()[0]
    _insert(engine, row)
    queue_digests(engine, cfg, NIGHT)
    with engine.begin() as conn:
        conn.execute(update(alerts).values(status="resolved", resolved_on=NIGHT))

    result = flush(engine, cfg)
    assert (result.sent, result.failed, result.cancelled) == (0, 0, 1)
    assert mailbox.messages == []
    assert _outbox_rows(engine)[0]["status"] == "cancelled"
    assert flush(engine, cfg).cancelled == 0

    # reopened (a new finding on the same episode): it has not reached anyone yet, so it goes out
    with engine.begin() as conn:
        conn.execute(update(alerts).values(status="open", resolved_on=None))
    assert queue_digests(engine, cfg, date(2025, 6, 6)) == 1
    assert flush(engine, cfg).sent == 1
    assert len(mailbox.messages) == 1


# ---- outages and refusals -------------------------------------------------------------------

def test_smtp_outage_delays_then_delivers_exactly_once(engine, mailbox, monkeypatch):
    rows = _cohort()
    _insert(engine, *rows)
    queue_digests(engine, _config(), NIGHT)
    queued_id = _outbox_rows(engine)[0]["message_id"]

    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(_closed_port()))
    down = _config()
    for attempt in (1, 2):
        result = flush(engine, down, retry_now=True)
        assert (result.sent, result.failed, result.alerts_notified) == (0, 1, 0)
        assert len(result.errors) == 1 and "\n" not in result.errors[0]
        assert not any(r["patient_id"] in result.errors[0] for r in rows)
        row = _outbox_rows(engine)[0]
        assert (row["status"], row["attempts"], row["sent_at"]) == ("pending", attempt, None)
        assert "refused the connection" in row["last_error"]
        states = _alert_rows(engine).values()
        assert {a["status"] for a in states} == {"open"}
        assert all(a["notified_at"] is None for a in states)
    # the outage night's queue run again changes nothing
    assert queue_digests(engine, down, NIGHT) == 0
    assert mailbox.messages == []

    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(mailbox.port))
    up = _config()
    result = flush(engine, up, retry_now=True)
    assert (result.sent, result.failed, result.alerts_notified) == (1, 0, 4)
    assert flush(engine, up).sent == 0
    assert len(mailbox.messages) == 1
    assert mailbox.messages[0]["Message-ID"] == queued_id
    row = _outbox_rows(engine)[0]
    assert (row["status"], row["attempts"]) == ("sent", 3)
    assert {a["status"] for a in _alert_rows(engine).values()} == {"notified"}


def test_refused_recipient_stays_pending_while_the_other_is_delivered(engine, mailbox):
    refused, fine = "ward-b@hospital.example", "ward-a@hospital.example"
    cfg = _config(recipients=[refused, fine])
    assert recipients_for("000123", cfg) == [refused, fine]
    _insert(engine, *_cohort())
    assert queue_digests(engine, cfg, NIGHT) == 2
    mailbox.refuse(refused)

    result = flush(engine, cfg)
    assert (result.sent, result.failed) == (1, 1)
    # one recipient accepted: the alerts have reached a nurse
    assert result.alerts_notified == 4
    assert [env[1] for env in mailbox.envelopes] == [[fine]]
    by_recipient = {r["recipient"]: r for r in _outbox_rows(engine)}
    assert by_recipient[fine]["status"] == "sent"
    assert by_recipient[refused]["status"] == "pending"
    assert "550" in by_recipient[refused]["last_error"]
    assert refused in result.errors[0] and "550" in result.errors[0]

    # notified alerts are not queued again, but the refused recipient's digest still holds them
    assert queue_digests(engine, cfg, NIGHT) == 0
    mailbox.refuse()
    result = flush(engine, cfg, retry_now=True)
    assert (result.sent, result.failed, result.alerts_notified) == (1, 0, 0)
    assert sorted(env[1][0] for env in mailbox.envelopes) == sorted([fine, refused])
    assert flush(engine, cfg).sent == 0
    assert len(mailbox.messages) == 2
    text, _ = _parts(mailbox.messages[1])
    assert "RENAL_HOLD" in text and "MRN 000777" in text


def test_send_message_errors_are_one_line(mailbox):
    cfg = _config()
    mailbox.refuse("nobody@hospital.example")
    with pytest.raises(AlertDeliveryError, match=r"refused the recipient: 550") as refused:
        send_message(cfg.smtp, "nobody@hospital.example", "s", "t", "<p>h</p>", "<x.y@bonewatch>")
    down = cfg.smtp.model_copy(update={"port": _closed_port()})
    with pytest.raises(AlertDeliveryError, match="refused the connection") as unreachable:
        send_message(down, NURSES, "s", "t", "<p>h</p>", "<x.y@bonewatch>")
    with socket.socket() as silent:   # accepts the connection (backlog), never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        mute = cfg.smtp.model_copy(update={"port": silent.getsockname()[1], "timeout_s": 0.5})
        with pytest.raises(AlertDeliveryError, match="did not answer within 0.5 s") as timeout:
            send_message(mute, NURSES, "s", "t", "<p>h</p>", "<x.y@bonewatch>")
    for exc in (refused.value, unreachable.value, timeout.value):
        assert "\n" not in str(exc) and exc.__cause__ is None
    assert mailbox.messages == []


# ---- trend charts ------------------------------------------------------------------------------

def _history(settings, tmp_path) -> None:
    """Real lab and event rows (through ingest) behind the renal and ALP alerts of `_cohort()`."""
    write_feeds(tmp_path / "history", labs=[
        "000123,R1,2160-0,0.9,mg/dL,2025-04-01T08:00:00,final",
        "000123,R2,2160-0,97.2,umol/L,2025-05-15T08:00:00,final",      # 1.10 mg/dL
        "000123,R3,2160-0,1.4,mg/dL,2025-06-05T08:00:00,final",
        "000777,R4,6768-6,130,U/L,2025-04-10T08:00:00,final",
        "000777,R5,6768-6,170,U/L,2025-05-20T08:00:00,final",
    ], events=[
        "000123,birth_date,1950-03-14,1950-03-14,",
        "000123,sex,2025-01-01,F,",
        "000123,weight_kg,2025-03-20,70,",
        "000123,bisphosphonate_dose,2025-04-02T09:00:00,zoledronic_acid,4.0",
    ])
    ingest(settings, tmp_path / "history")


def test_digest_embeds_trend_charts_inline(engine, settings, mailbox, tmp_path):
    _history(settings, tmp_path)
    cfg = _config()
    _insert(engine, *_cohort())
    queue_digests(engine, cfg, NIGHT)
    assert flush(engine, cfg).sent == 1

    message = mailbox.messages[0]
    assert message.get_content_type() == "multipart/alternative"
    plain, related = list(message.iter_parts())
    assert plain.get_content_type() == "text/plain"
    # the HTML and its charts travel together: nothing is fetched from outside the message
    assert related.get_content_type() == "multipart/related"
    html_part, *images = list(related.iter_parts())
    assert html_part.get_content_type() == "text/html"
    assert [i.get_content_type() for i in images] == ["image/png", "image/png"]   # SCr/CrCl, ALP
    html = html_part.get_content()
    for image in images:
        png = image.get_content()
        assert png.startswith(b"\x89PNG") and 1000 < len(png) < 20_000      # a few KB
        assert f'src="cid:{image["Content-ID"].strip("<>")}"' in html
    assert re.findall(r'<img [^>]*src="([^"]+)"', html) == [f"cid:{i['Content-ID'].strip('<>')}" for i in images]
    text = " ".join(plain.get_content().split())     # the text part wraps at 76 characters
    # the renal chart: SCr against the 0.90 baseline, and the CrCl computed from the real history
    # (Cockcroft-Gault: female, 75 years, 70 kg)
    assert "Trend: SCr mg/dL: 0.90 (2025-04-01), 1.10 (2025-05-15), 1.40 (2025-06-05); baseline 0.90" in text
    assert "CrCl mL/min: 59.7 (2025-04-01), 48.9 (2025-05-15), 38.4 (2025-06-05); baseline 59.7" in text
    assert "ALP U/L: 130 (2025-04-10), 170 (2025-05-20)" in text
    assert text.index("Trend: SCr") < text.index("MRN 000456") < text.index("Trend: ALP")


def test_trend_crcl_uses_birth_date_and_sex_delivered_after_the_night(engine, settings, tmp_path):
    """SPEC 2.5: demographics are timeless; a Patient loaded after the night still gives its chart a CrCl."""
    write_feeds(tmp_path / "late", labs=["000123,R1,2160-0,0.9,mg/dL,2025-04-01T08:00:00,final"], events=[
        "000123,birth_date,2025-07-01,1950-03-14,", "000123,sex,2025-07-01,F,", "000123,weight_kg,2025-03-20,70,"])
    ingest(settings, tmp_path / "late")
    with engine.connect() as conn:
        scr, _ = load_trend_frames(conn, settings, ["000123"], NIGHT)
    assert scr["crcl"].tolist() == [59.7] and scr["crcl_missing"].tolist() == [""]


def test_trend_shows_the_value_the_rules_used_at_a_conflicting_instant(engine, settings, tmp_path):
    """Two creatinines at one instant: the chart draws the higher, as the rules use it, whatever the ids."""
    write_feeds(tmp_path / "clash", labs=["000123,R1,2160-0,1.2,mg/dL,2025-04-01T08:00:00,final",
                                          "000123,R2,2160-0,0.9,mg/dL,2025-04-01T08:00:00,final"], events=[
        "000123,birth_date,1950-03-14,1950-03-14,", "000123,sex,2025-01-01,F,", "000123,weight_kg,2025-03-20,70,"])
    ingest(settings, tmp_path / "clash")
    with engine.connect() as conn:
        scr, _ = load_trend_frames(conn, settings, ["000123"], NIGHT)
    assert scr["value"].tolist() == [1.2] and scr["crcl"].tolist() == [44.8]


# ---- routing by care team ---------------------------------------------------------------------

def test_digests_are_routed_by_the_latest_care_team(engine, settings, mailbox, tmp_path, caplog):
    team_a, team_b = "myeloma-a@hospital.example", "myeloma-b@hospital.example"
    write_feeds(tmp_path / "teams", labs=[], events=[
        "000123,care_team,2025-01-10,Myeloma-B,",
        "000123,care_team,2025-05-01,myeloma-a,",          # moved to team A: the latest wins
        "000456,care_team,2025-05-01,myeloma-b,",
        "000777,care_team,2025-05-01,haematology-day-unit,",   # not configured: default recipients
        "000888,care_team,2025-06-20,myeloma-a,",          # after the night: not yet known
    ])
    ingest(settings, tmp_path / "teams")
    cfg = _config()
    cfg = cfg.model_copy(update={"recipients": cfg.recipients.model_copy(update={
        "teams": {"myeloma-a": [team_a], "myeloma-b": [team_b]}})})
    assert recipients_for("000123", cfg, "MYELOMA-A ") == [team_a]
    assert recipients_for("000123", cfg, "other") == [NURSES]
    late = _alert("000888", "DENTAL_EXAM_MISSING", "medium", evidence={"summary": "no dental exam"})
    _insert(engine, *_cohort(), late)

    with caplog.at_level(logging.DEBUG, logger="bonewatch"):
        assert queue_digests(engine, cfg, NIGHT) == 3
    # a care team's name is feed text: the log counts the unknown ones, never names them
    assert "1 care team(s) not in [recipients.teams]" in caplog.text
    assert "haematology" not in caplog.text
    assert flush(engine, cfg).sent == 3
    by_recipient = {rcpts[0]: _parts(m)[0] for m, (_, rcpts) in zip(mailbox.messages, mailbox.envelopes, strict=True)}
    assert set(by_recipient) == {team_a, team_b, NURSES}
    mrns = {who: set(re.findall(r"^MRN (\d+)", text, re.M)) for who, text in by_recipient.items()}
    assert mrns == {team_a: {"000123"}, team_b: {"000456"}, NURSES: {"000777", "000888"}}


# ---- ready-made messages (data quality) ---------------------------------------------------------

def test_queue_message_is_idempotent_and_sent_once_with_its_stored_body(engine, mailbox, monkeypatch):
    data_team = ["clinical-data-team@hospital.example", "dq-owner@hospital.example"]
    args = dict(kind="data_quality", recipients=data_team, night=NIGHT, subject="[bonewatch] labs feed late",
                text="The labs feed for 2025-06-05 has not arrived.", html="<p>The labs feed has not arrived.</p>",
                key="late:labs:2025-06-05")
    assert queue_message(engine, **args) == 2
    assert queue_message(engine, **args) == 0                            # same key: nothing new
    assert queue_message(engine, **{**args, "text": "reworded"}) == 0   # the key decides, not the body
    with pytest.raises(ValueError):
        queue_message(engine, **{**args, "kind": "digest"})

    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(_closed_port()))
    result = flush(engine, _config())
    assert (result.sent, result.failed) == (0, 2)
    assert {r["status"] for r in _outbox_rows(engine)} == {"pending"}
    assert all("refused the connection" in r["last_error"] for r in _outbox_rows(engine))

    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(mailbox.port))
    cfg = _config()
    result = flush(engine, cfg, retry_now=True)
    assert (result.sent, result.failed, result.alerts_notified) == (2, 0, 0)
    assert flush(engine, cfg, retry_now=True).sent == 0                  # accepted: never sent again
    assert queue_message(engine, **args) == 0
    assert sorted(rcpts[0] for _, rcpts in mailbox.envelopes) == sorted(data_team)
    message = mailbox.messages[0]
    assert message["Subject"] == "[bonewatch] labs feed late"
    assert tuple(p.replace("\r\n", "\n") for p in _parts(message)) == ("The labs feed for 2025-06-05 has not arrived.\n",
                               "<p>The labs feed has not arrived.</p>\n")
    assert message["Message-ID"] == message_id_for_key("data_quality", "late:labs:2025-06-05", message["To"])
    assert NURSES not in {rcpts[0] for _, rcpts in mailbox.envelopes}

    # text only works too
    assert queue_message(engine, **{**args, "key": "k2", "html": None, "recipients": data_team[:1]}) == 1
    assert flush(engine, cfg).sent == 1
    assert mailbox.messages[-1].get_content_type() == "text/plain"


# ---- back-off ---------------------------------------------------------------------------------

def test_failed_message_waits_out_its_backoff(engine, mailbox, monkeypatch):
    _insert(engine, *_cohort())
    queue_digests(engine, _config(), NIGHT)
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(_closed_port()))
    down = _config()
    t0 = datetime(2025, 6, 6, 2, 0)
    assert flush(engine, down, now=t0).failed == 1
    assert _outbox_rows(engine)[0]["next_attempt_at"] == t0 + timedelta(seconds=60)
    assert flush(engine, down, now=t0 + timedelta(seconds=61)).failed == 1      # second failure
    assert _outbox_rows(engine)[0]["next_attempt_at"] == t0 + timedelta(seconds=61 + 120)

    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(mailbox.port))
    up = _config()
    early = flush(engine, up, now=t0 + timedelta(seconds=62))
    assert (early.sent, early.failed, early.deferred) == (0, 0, 1)
    assert "waiting until 2025-06-06 02:03 UTC" in early.errors[0]
    assert _outbox_rows(engine)[0]["attempts"] == 2 and mailbox.messages == []
    assert flush(engine, up, now=t0 + timedelta(seconds=181)).sent == 1
    assert len(mailbox.messages) == 1
    assert backoff(up, 10) == timedelta(seconds=1800)                          # capped


# ---- audit ----------------------------------------------------------------------------------

def test_every_state_change_and_send_attempt_is_audited(engine, mailbox, monkeypatch):
    from bonewatch.model import Finding, Severity
    from bonewatch.store.alerts import acknowledge, sync_findings

    def finding(pid: str, rule: str) -> Finding:
        return Finding(pid, rule, "1", Severity.HIGH, "e1", NIGHT, "act", "cite", {"summary": "s"})

    with engine.begin() as conn:
        sync_findings(conn, [finding("000123", "RENAL_HOLD"), finding("000456", "DOSE_BAND")], NIGHT)
    hold, band = alert_id("000123", "RENAL_HOLD", "e1"), alert_id("000456", "DOSE_BAND", "e1")
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(_closed_port()))
    queue_digests(engine, _config(), NIGHT)
    flush(engine, _config())
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(mailbox.port))
    flush(engine, _config(), retry_now=True)
    with engine.begin() as conn:
        assert acknowledge(conn, hold, "R. Nurse", datetime(2025, 6, 6, 8, 0)) == "notified"
        assert acknowledge(conn, hold, "Someone Else", datetime(2025, 6, 6, 9, 0)) == "acknowledged"
        sync_findings(conn, [finding("000123", "RENAL_HOLD")], date(2025, 6, 6))     # band cleared
        sync_findings(conn, [finding("000123", "RENAL_HOLD"), finding("000456", "DOSE_BAND")], date(2025, 6, 7))

    trail = [(r["event"], r["alert_id"], r["from_status"], r["to_status"], r["actor"], r["result"])
             for r in _audit(engine)]
    message_id = message_id_for(NURSES, NIGHT)
    assert trail == [
        ("raised", hold, None, "open", "evaluate", "ok"),
        ("raised", band, None, "open", "evaluate", "ok"),
        ("send", None, "pending", "pending", "outbox", "failed"),
        ("send", None, "pending", "sent", "outbox", "accepted"),
        *[("notified", a, "open", "notified", "outbox", "accepted") for a in sorted([hold, band])],
        ("acknowledged", hold, "notified", "acknowledged", "cli:R. Nurse", "ok"),
        ("resolved", band, "notified", "resolved", "evaluate", "ok"),
        ("reopened", band, "resolved", "open", "evaluate", "ok"),
    ]
    sends = [r for r in _audit(engine) if r["event"] == "send"]
    assert all(r["message_id"] == message_id for r in sends)
    assert "refused the connection" in sends[0]["detail"] and NURSES in sends[0]["detail"]
    # no patient identifier anywhere in the trail
    assert not any(mrn in json.dumps(r, default=str) for r in _audit(engine) for mrn in ("000123", "000456"))


# ---- PHI-minimal mode ------------------------------------------------------------------------

def test_phi_minimal_digest_has_mrn_rule_severity_and_link_only(engine, settings, mailbox, monkeypatch, tmp_path):
    _history(settings, tmp_path)     # charts would be drawn from it in the full mode
    monkeypatch.setenv("BONEWATCH_ACK_SECRET", "s3cret-" + "x" * 32)   # at least 32 characters
    cfg = _config(phi_minimal=True)
    rows = _cohort()
    evidence = json.loads(rows[2]["evidence"])
    # a name and a birth date in the evidence must never reach the email in this mode
    rows[2]["evidence"] = json.dumps({**evidence, "patient_name": "Jane Q. Doe", "birth_date": "1950-03-14",
                                      "crcl": {"age_years": 75, "weight_kg": 70.0, "value_ml_min": 45.3}})
    _insert(engine, *rows)
    queue_digests(engine, cfg, NIGHT)
    assert flush(engine, cfg).sent == 1

    message = mailbox.messages[0]
    assert [p.get_content_type() for p in message.walk()] == ["multipart/alternative", "text/plain", "text/html"]
    for part in _parts(message):
        for row in rows:
            assert f"MRN {row['patient_id']}" in part
            assert row["rule"] in part
            assert f"https://bonewatch.hospital.example/alerts/{row['alert_id']}?t=" in part   # signed link
            evidence = json.loads(row["evidence"])
            assert evidence["summary"] not in part
            assert row["action"] not in part
        for leaked in ("1.4", "0.9", "1.10", "mg/dL", "U/L", "mL/min", "45.3", "170", "2025-04-01", "2025-05-20",
                       "VGPR", "baseline", "Zoledronic acid label", "Jane", "Doe", "1950", "03-14",
                       "Trend"):
            assert leaked not in part, leaked
        assert "URGENT" in part and DISCLAIMER in part
    raw = message.as_string()
    for leaked in ("Jane", "1950-03-14", "2025-04-01", "image/png"):
        assert leaked not in raw


# ---- golden files ------------------------------------------------------------------------------

def _golden_settings(phi_minimal: bool) -> Settings:
    cfg = load_settings()
    return cfg.model_copy(update={"site": cfg.site.model_copy(update={
        "name": "Test Hospital oncology", "phi_minimal": phi_minimal,
        "ack_base_url": "https://bonewatch.hospital.example"})})


def _golden_inputs():
    """The cohort with fixed links, one reminder and a renal trend: every piece of the layout."""
    rows = _cohort()
    renal = next(r for r in rows if r["rule"] == "RENAL_HOLD")
    renal.update(status="notified", last_notified_night=date(2025, 6, 3))
    links = {r["alert_id"]: f"https://bonewatch.hospital.example/alerts/{r['alert_id']}?t=TOKEN-{r['rule']}"
             for r in rows}
    trend = Trend("000123", "renal", "Serum creatinine and CrCl (Cockcroft-Gault)", (
        ChartSeries("SCr", "mg/dL", ((date(2025, 4, 1), 0.9), (date(2025, 5, 15), 1.1), (date(2025, 6, 5), 1.4)),
                    0.9, date(2025, 4, 1), 2),
        ChartSeries("CrCl", "mL/min", ((date(2025, 4, 1), 59.9), (date(2025, 5, 15), 49.0),
                                       (date(2025, 6, 5), 38.5)), 59.9, date(2025, 4, 1), 1)))
    return rows, links, {"000123": [trend]}, [renal["alert_id"]]


@pytest.mark.parametrize("name, phi_minimal", [("digest.txt", False),
                                               ("digest_phi_minimal.txt", True)])
def test_digest_text_matches_golden(name, phi_minimal):
    """Set BONEWATCH_REGEN_GOLDEN=1 to rewrite tests/golden/* after an intended change."""
    rows, links, trends, reminders = _golden_inputs()
    digest = render_digest(NURSES, NIGHT, rows, _golden_settings(phi_minimal), links=links, trends=trends,
                           reminders=reminders)
    path = GOLDEN / name
    if REGEN_GOLDEN:
        path.write_text(digest.text, encoding="utf-8")
    assert digest.text == path.read_text(encoding="utf-8")
    assert len(digest.images) == (0 if phi_minimal else 1)


def test_digest_names_a_same_instant_conflict_under_the_alert():
    """Two creatinines at one instant: the nurse reads both values and which one the rule used."""
    said = "two creatinines at 2025-06-05 08:00: 1.9 and 1.2 mg/dL; the higher (1.9) is used"
    row = _alert("000123", "RENAL_HOLD", "high", evidence={"summary": "SCr 1.90 mg/dL", "conflict": said})
    text = " ".join(render_digest(NURSES, NIGHT, [row], _golden_settings(False)).text.split())
    assert f"Note: conflict: {said}" in text


def test_render_is_pure_and_escapes_html():
    cfg = _golden_settings(False)
    row = _alert("<b>7</b>", "RENAL_HOLD", "high",
                 evidence={"summary": "SCr <script>alert(1)</script> & more"})
    first = render_digest(NURSES, NIGHT, [row], cfg)
    assert first == render_digest(NURSES, NIGHT, [dict(row)], cfg)
    assert "<script>" not in first.html and "&lt;script&gt;" in first.html
    assert "&lt;b&gt;7&lt;/b&gt;" in first.html
    assert "SCr <script>alert(1)</script> & more" in first.text   # plain text is not escaped
    assert first.subject == ("bonewatch: 1 alert for 1 patient, 1 urgent \N{EM DASH} "
                             "night of 2025-06-05")


def test_digest_says_when_a_result_had_no_collection_time_of_its_own():
    """A FHIR result timed by its DiagnosticReport: the nurse reads whose time the alert dates."""
    said = ("the creatinine of 2025-06-04 had no collection time of its own: the effective time of the "
            "DiagnosticReport that lists it is used")
    row = _alert("000123", "RENAL_HOLD", "high", evidence={"summary": "SCr 1.90 mg/dL", "time_basis": [said]})
    text = " ".join(render_digest(NURSES, NIGHT, [row], _golden_settings(False)).text.split())
    assert f"Note: time basis: {said}" in text
