"""Silences (issue 17): an alert muted for a stated time, with a reason, without acknowledging it.

Driven through the real nightly pipeline (ingest, rules, outbox, the session's SMTP server) on
both stores, night after night: a silenced alert sends nothing while the silence holds, not even
its reminders, and comes back when the silence ends if its condition still holds; resolved
meanwhile, it stays quiet. The CLI (`silence`, `silences`, `unsilence`, `alerts`), the audit rows
and the ack page's silence form are checked against the same store.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, time, timedelta

import httpx
import pytest

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.errors import SilenceError
from bonewatch.notify.outbox import flush, queue_digests
from bonewatch.store import silences
from bonewatch.web import create_app
from tests.integration.alerting import (
    SECRET,
    alert_row,
    alert_rows,
    audit_rows,
    ingest,
    insert_alerts,
    outbox_rows,
    parts,
    run_cli,
    served,
    write_feeds,
)

FIRST = date(2025, 6, 1)
PATIENT = "000321"


def _clock(night: date, hour: int = 23) -> datetime:
    """The nightly run's clock on that night (aware UTC, as Airflow hands it over)."""
    return datetime.combine(night, time(hour), tzinfo=UTC)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _renal_hold_history(settings, tmp_path) -> None:
    """One patient on zoledronic acid whose creatinine rose 0.6 mg/dL over a 0.9 baseline on
    2025-06-01 and stays there: a RENAL_HOLD found every night (high severity, reminded every
    2 nights while nobody acknowledges it)."""
    write_feeds(tmp_path / "history", labs=[
        f"{PATIENT},C1,2160-0,0.9,mg/dL,2025-04-01T08:00:00,final",
        f"{PATIENT},C2,2160-0,1.5,mg/dL,2025-06-01T08:00:00,final",
    ], events=[
        f"{PATIENT},diagnosis,2025-01-05,MM,C90.00",
        f"{PATIENT},birth_date,1955-02-01,1955-02-01,",
        f"{PATIENT},sex,2025-01-05,M,",
        f"{PATIENT},dental_exam,2025-03-01,,",
        f"{PATIENT},bisphosphonate_dose,2025-04-02T09:00:00,zoledronic_acid,4.0",
    ])
    ingest(settings, tmp_path / "history")


def _hold(engine) -> dict:
    (hold,) = [a for a in alert_rows(engine).values() if a["rule"] == "RENAL_HOLD"]
    return hold


def _carrying(mailbox, alert_id: str) -> int:
    """How many caught messages carry this alert (its id is in every digest's text)."""
    return sum(alert_id in parts(message)[0] for message in mailbox.messages)


def _nights(cfg, mailbox, engine, nights: list[date], *, clock=_clock) -> dict[date, int]:
    """Run the nights in order; {night: messages carrying the RENAL_HOLD alert sent that night}."""
    sent = {}
    for night in nights:
        before = len(mailbox.messages)
        pipeline.nightly(cfg, night, now=None if clock is None else clock(night))
        hold = _hold(engine)["alert_id"]
        sent[night] = sum(hold in parts(m)[0] for m in mailbox.messages[before:])
    return sent


def _days(first: date, count: int) -> list[date]:
    return [first + timedelta(days=n) for n in range(count)]


def test_silenced_alert_sends_nothing_for_its_nights_and_returns_when_it_expires(
        engine, settings, mailbox, tmp_path):
    _renal_hold_history(settings, tmp_path)
    cfg = load_settings()                       # after `mailbox` pointed BONEWATCH_SMTP_* at the server
    assert _nights(cfg, mailbox, engine, [FIRST]) == {FIRST: 1}
    hold = _hold(engine)
    # the nurse silences it the next morning, for 3 days: until 06-05 08:00
    with engine.begin() as conn:
        made = silences.create(conn, alert_id=hold["alert_id"], duration=silences.parse_duration("3d", 90),
                               reason="infusion cancelled", by="R. Nurse",
                               at=_naive(_clock(FIRST + timedelta(days=1), 8)))
    # unsilenced, its reminder would go on 06-03 (every 2 nights); silenced, nothing goes out
    sent = _nights(cfg, mailbox, engine, _days(FIRST + timedelta(days=1), 6))
    assert sent == {date(2025, 6, 2): 0, date(2025, 6, 3): 0, date(2025, 6, 4): 0,
                    # expired at 06-05 08:00, still true: the 06-05 run emails it, then reminders resume
                    date(2025, 6, 5): 1, date(2025, 6, 6): 0, date(2025, 6, 7): 1}
    row = _hold(engine)
    assert (row["status"], row["acknowledged_by"], row["notify_count"]) == ("notified", None, 3)

    events = [(r["event"], r["actor"], r["alert_id"]) for r in audit_rows(engine)
              if r["event"] in ("silenced", "unsilenced", "silence_ended")]
    assert events == [("silenced", "cli:R. Nurse", hold["alert_id"]), ("silence_ended", "outbox", None)]
    for entry in audit_rows(engine):
        assert PATIENT not in (entry["detail"] or "") and "infusion" not in (entry["detail"] or "")
    with engine.connect() as conn:
        (listed,) = silences.list_silences(conn, _naive(_clock(date(2025, 6, 7))), everything=True)
    assert (listed["silence_id"], listed["state"], listed["released_at"]) == (
        made["silence_id"], "expired", _naive(_clock(date(2025, 6, 5))))


def test_patient_and_rule_silence_covers_an_alert_raised_after_it(engine, settings, mailbox, tmp_path):
    _renal_hold_history(settings, tmp_path)
    cfg = load_settings()
    # made before the alert exists (Alertmanager's semantics): it mutes what it matches when raised
    with engine.begin() as conn:
        made = silences.create(conn, patient_id=PATIENT, rule="RENAL_HOLD", duration=timedelta(days=3),
                               reason="moved to hospice care", by="A. Nurse", at=datetime(2025, 5, 31, 12))
    assert made["covers"] == []
    sent = _nights(cfg, mailbox, engine, _days(FIRST, 4))
    # holds until 06-03 12:00: quiet on 06-01 and 06-02, emailed for the first time on 06-03
    assert sent == {date(2025, 6, 1): 0, date(2025, 6, 2): 0, date(2025, 6, 3): 1, date(2025, 6, 4): 0}
    assert _hold(engine)["status"] == "notified"
    with engine.connect() as conn:
        assert silences.active_for_patient(conn, PATIENT, datetime(2025, 6, 2, 12)) == {
            _hold(engine)["alert_id"]: {"until": datetime(2025, 6, 3, 12), "reason": "moved to hospice care",
                                        "by": "A. Nurse", "silence_id": made["silence_id"]}}
        assert silences.active_for_patient(conn, PATIENT, datetime(2025, 6, 3, 12)) == {}
    # another rule of the same patient is not matched, nor another patient
    other = alert_row(PATIENT, "DOSE_BAND", "high")
    insert_alerts(engine, other, alert_row("000999", "RENAL_HOLD", "high"))
    with engine.connect() as conn:
        assert other["alert_id"] not in silences.active_for_patient(conn, PATIENT, datetime(2025, 6, 2, 12))
        assert silences.active_for_patient(conn, "000999", datetime(2025, 6, 2, 12)) == {}


def test_silenced_then_resolved_sends_nothing_when_the_silence_ends(engine, settings, mailbox, tmp_path):
    _renal_hold_history(settings, tmp_path)
    cfg = load_settings()
    assert _nights(cfg, mailbox, engine, [FIRST]) == {FIRST: 1}
    hold = _hold(engine)["alert_id"]
    with engine.begin() as conn:
        silences.create(conn, alert_id=hold, duration=timedelta(days=2), reason="seen in clinic", by="R. Nurse",
                        at=_naive(_clock(FIRST, 23)) + timedelta(minutes=30))
    # creatinine back to baseline on 06-02: the hold clears (RENAL_RESUME is a new alert)
    write_feeds(tmp_path / "recovered", labs=[f"{PATIENT},C3,2160-0,0.95,mg/dL,2025-06-02T08:00:00,final"],
                events=[], name="recovered")
    ingest(settings, tmp_path / "recovered")
    sent = _nights(cfg, mailbox, engine, _days(FIRST + timedelta(days=1), 5))
    assert sent == dict.fromkeys(_days(FIRST + timedelta(days=1), 5), 0)
    assert alert_rows(engine)[hold]["status"] == "resolved"
    assert [r["event"] for r in audit_rows(engine) if r["alert_id"] == hold and r["event"] == "notified"] == ["notified"]
    assert any(r["event"] == "silence_ended" for r in audit_rows(engine))


def test_cli_silence_list_unsilence_and_alerts(engine, settings, mailbox, tmp_path):
    """The wall clock throughout, as a nurse uses it: silence, list, unsilence; the next night emails."""
    _renal_hold_history(settings, tmp_path)
    cfg = load_settings()
    assert _nights(cfg, mailbox, engine, [FIRST], clock=None) == {FIRST: 1}
    hold = _hold(engine)["alert_id"]

    done = run_cli("silence", hold, "--for", "14d", "--reason", "infusion cancelled by oncologist",
                   "--by", "R. Nurse")
    assert done.returncode == 0, done.stderr
    silence_id = int(re.search(r"silence (\d+):", done.stdout).group(1))
    until = re.search(r"silenced until (\S+ \S+) UTC", done.stdout).group(1)
    assert f"alert {hold} silenced until" in done.stdout and "by R. Nurse" in done.stdout
    assert abs(datetime.fromisoformat(until) - (pipeline._now() + timedelta(days=14))) < timedelta(minutes=2)

    listed = run_cli("silences")
    assert listed.returncode == 0
    for words in (str(silence_id), "active", f"alert {hold}", "R. Nurse", "infusion cancelled by oncologist", until):
        assert words in listed.stdout, words
    (as_json,) = [json.loads(line) for line in run_cli("silences", "--format", "json").stdout.splitlines()]
    assert (as_json["created_by"], as_json["reason"], as_json["alerts"]) == (
        "R. Nurse", "infusion cancelled by oncologist", [hold])

    table = run_cli("alerts")
    assert f"until {until} UTC by R. Nurse" in table.stdout
    (row,) = [json.loads(line) for line in run_cli("alerts", "--format", "json").stdout.splitlines()
              if json.loads(line)["alert_id"] == hold]
    assert row["status"] == "notified" and row["silenced"]["by"] == "R. Nurse"

    # nights 2 and 3: the reminder due on night 3 is held back
    assert _nights(cfg, mailbox, engine, _days(FIRST + timedelta(days=1), 2), clock=None) == {
        date(2025, 6, 2): 0, date(2025, 6, 3): 0}

    ended = run_cli("unsilence", str(silence_id), "--by", "S. Charge")
    assert ended.returncode == 0 and f"silence {silence_id} (alert {hold}) ended by S. Charge" in ended.stdout
    assert "no active silences" in run_cli("silences").stdout
    everything = run_cli("silences", "--all").stdout
    assert "ended by S. Charge" in everything and "infusion cancelled by oncologist" in everything
    assert f"until {until}" not in run_cli("alerts").stdout
    # unsilenced early: the next night emails it again
    assert _nights(cfg, mailbox, engine, [date(2025, 6, 4)], clock=None) == {date(2025, 6, 4): 1}

    again = run_cli("unsilence", str(silence_id), "--by", "S. Charge")
    assert again.returncode == 2 and "has already ended" in again.stderr
    events = [(r["event"], r["actor"], r["alert_id"]) for r in audit_rows(engine)
              if r["event"] in ("silenced", "unsilenced", "silence_ended")]
    assert events == [("silenced", "cli:R. Nurse", hold), ("unsilenced", "cli:S. Charge", hold),
                      ("silence_ended", "outbox", None)]


@pytest.mark.parametrize("args, words", [
    (["--for", "14x"], "is not a duration: write a whole number and h, d or w"),
    (["--for", "1d12h"], "is not a duration"),
    (["--for", "0d"], "is not a duration"),
    (["--for", "91d"], "longer than the 90 days a silence may last"),
    (["--for", "13w"], "longer than the 90 days"),
    (["--for", "3d", "--rule", "NO_SUCH_RULE", "--patient", "000001"], "is not a rule id"),
    (["--for", "3d", "--reason", "  "], "needs a reason"),
])
def test_bad_silences_are_refused_with_one_line(engine, args, words):
    insert_alerts(engine, alert_row("000123", "RENAL_HOLD", "high"))
    (alert_id,) = alert_rows(engine)
    target = [] if "--patient" in args else [alert_id]
    base = {"--reason": "handled", "--by": "R. Nurse"}
    extra = [x for k, v in base.items() if k not in args for x in (k, v)]
    done = run_cli("silence", *target, *args, *extra)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr
    assert run_cli("silences", "--all").stdout.strip() == "no silences"


def test_unknown_alert_or_silence_is_one_line(engine):
    done = run_cli("silence", "Anosuchalert0000", "--for", "3d", "--reason", "x", "--by", "R. Nurse")
    assert (done.returncode, done.stderr) == (1, "bonewatch: no alert Anosuchalert0000\n")
    done = run_cli("unsilence", "42", "--by", "R. Nurse")
    assert (done.returncode, done.stderr) == (1, "bonewatch: no silence 42\n")
    insert_alerts(engine, alert_row("000123", "RENAL_HOLD", "high"))
    (alert_id,) = alert_rows(engine)
    for target in ([], [alert_id, "--patient", "000123"]):
        done = run_cli("silence", *target, "--for", "3d", "--reason", "x", "--by", "R. Nurse")
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "either one alert" in done.stderr


def test_parse_duration_units():
    assert silences.parse_duration("12h", 90) == timedelta(hours=12)
    assert silences.parse_duration("14d", 90) == timedelta(days=14)
    assert silences.parse_duration("2w", 90) == timedelta(days=14)
    assert silences.parse_duration("90d", 90) == timedelta(days=90)
    with pytest.raises(SilenceError):
        silences.parse_duration("30d", 29)


def test_alert_silenced_after_its_digest_was_queued_is_left_out_when_it_goes(engine, mailbox):
    cfg = load_settings()
    quiet = alert_row("000123", "RENAL_HOLD", "high")
    loud = alert_row("000456", "DOSE_BAND", "high")
    insert_alerts(engine, quiet, loud)
    assert queue_digests(engine, cfg, FIRST) == 1
    with engine.begin() as conn:
        silences.create(conn, alert_id=quiet["alert_id"], duration=timedelta(days=1), reason="handled by phone",
                        by="R. Nurse", at=pipeline._now())
    assert flush(engine, cfg).sent == 1
    text = parts(mailbox.messages[-1])[0]
    assert loud["alert_id"] in text and quiet["alert_id"] not in text
    rows = alert_rows(engine)
    assert (rows[quiet["alert_id"]]["status"], rows[loud["alert_id"]]["status"]) == ("open", "notified")
    (sent,) = outbox_rows(engine)
    assert json.loads(sent["alert_ids"]) == [loud["alert_id"]]
    # every alert of a digest silenced: the message is cancelled, nothing is sent
    insert_alerts(engine, alert_row("000789", "REVIEW_1Y", "medium"))
    (review,) = [a for a, r in alert_rows(engine).items() if r["rule"] == "REVIEW_1Y"]
    assert queue_digests(engine, cfg, FIRST + timedelta(days=1)) == 1
    with engine.begin() as conn:
        silences.create(conn, patient_id="000789", duration=timedelta(hours=12), reason="hospice",
                        by="R. Nurse", at=pipeline._now())
        silences.create(conn, alert_id=quiet["alert_id"], duration=timedelta(hours=12), reason="again",
                        by="R. Nurse", at=pipeline._now())
    before = len(mailbox.messages)
    assert flush(engine, cfg).cancelled == 1
    assert len(mailbox.messages) == before and alert_rows(engine)[review]["status"] == "open"


def test_notified_alert_never_reminded_comes_back_once_when_its_silence_ends(engine, mailbox):
    """Medium severity is never reminded: only the silence's end brings it back, once, and not
    when it resolved meanwhile."""
    from sqlalchemy import update

    from bonewatch.store.tables import alerts

    cfg = load_settings()
    review = alert_row("000555", "REVIEW_1Y", "medium", night=FIRST)
    gone = alert_row("000556", "REVIEW_2Y", "medium", night=FIRST)
    insert_alerts(engine, review, gone)
    queue_digests(engine, cfg, FIRST)
    assert flush(engine, cfg).alerts_notified == 2
    with engine.begin() as conn:
        for row in (review, gone):
            silences.create(conn, alert_id=row["alert_id"], duration=timedelta(days=2), reason="reviewed in clinic",
                            by="R. Nurse", at=datetime(2025, 6, 1, 12))
        conn.execute(update(alerts).where(alerts.c.alert_id == gone["alert_id"])
                     .values(status="resolved", resolved_on=date(2025, 6, 2)))
    assert queue_digests(engine, cfg, date(2025, 6, 2), silences_at=datetime(2025, 6, 2, 23)) == 0
    assert queue_digests(engine, cfg, date(2025, 6, 3), silences_at=datetime(2025, 6, 3, 11)) == 0
    # ended at 06-03 12:00: the 06-03 run after it queues the one still live, once
    assert queue_digests(engine, cfg, date(2025, 6, 3), silences_at=datetime(2025, 6, 3, 23)) == 1
    assert flush(engine, cfg).sent == 1
    text = parts(mailbox.messages[-1])[0]
    assert review["alert_id"] in text and gone["alert_id"] not in text
    assert queue_digests(engine, cfg, date(2025, 6, 4), silences_at=datetime(2025, 6, 4, 23)) == 0
    assert len(mailbox.messages) == 2
    assert [r["event"] for r in audit_rows(engine) if r["event"] == "silence_ended"] == ["silence_ended"] * 2


@pytest.fixture
def page(engine, mailbox, monkeypatch):
    """One alert emailed with a signed link, and the app serving it: (base url, alert id, link)."""
    monkeypatch.setenv("BONEWATCH_ACK_SECRET", SECRET)
    hold = alert_row("000123", "RENAL_HOLD", "high", evidence={"summary": "SCr 1.40 mg/dL, 0.50 above baseline"})
    insert_alerts(engine, hold)
    settings = load_settings()
    with served(create_app(settings, engine=engine)) as base:
        settings = settings.model_copy(update={"site": settings.site.model_copy(update={"ack_base_url": base})})
        queue_digests(engine, settings, FIRST)
        assert flush(engine, settings).sent == 1
        (link,) = re.findall(r"or open (\S+/alerts/\w+\?t=\S+)", parts(mailbox.messages[0])[0])
        yield base, hold["alert_id"], link


def test_ack_page_silences_through_the_signed_token(page, engine):
    base, alert_id, link = page
    token = link.split("?t=", 1)[1]
    with httpx.Client() as client:
        shown = client.get(link)
        assert shown.status_code == 200
        assert f'action="/alerts/{alert_id}/silence"' in shown.text and "Silence for this time" in shown.text
        assert 'method="post"' in shown.text and '<option value="90d"' in shown.text

        # refusals: no reason, a length not offered, a tampered token, a GET
        nameless = client.post(f"{base}/alerts/{alert_id}/silence",
                               data={"t": token, "by": "R. Nurse", "reason": " ", "for": "14d"})
        assert nameless.status_code == 400 and "a reason are needed" in nameless.text
        too_long = client.post(f"{base}/alerts/{alert_id}/silence",
                               data={"t": token, "by": "R. Nurse", "reason": "x", "for": "120d"})
        assert too_long.status_code == 400 and "longer than the 90 days" in too_long.text
        forged = client.post(f"{base}/alerts/{alert_id}/silence",
                             data={"t": token[:-3] + "AAA", "by": "R. Nurse", "reason": "x", "for": "14d"})
        assert forged.status_code == 403
        assert client.get(f"{base}/alerts/{alert_id}/silence", params={"t": token}).status_code == 405
        huge = client.post(f"{base}/alerts/{alert_id}/silence",
                           data={"t": token, "by": "R. Nurse", "reason": "x" * 9000, "for": "14d"})
        assert huge.status_code == 413
        with engine.connect() as conn:
            assert silences.list_silences(conn, pipeline._now(), everything=True) == []

        done = client.post(f"{base}/alerts/{alert_id}/silence",
                           data={"t": token, "by": "R. Nurse", "reason": "infusion cancelled", "for": "7d"})
        assert done.status_code == 200 and f"Alert {alert_id} silenced by R. Nurse until" in done.text
        assert "Silenced until" in client.get(link).text
    assert alert_rows(engine)[alert_id]["status"] == "notified"        # not acknowledged
    with engine.connect() as conn:
        (made,) = silences.list_silences(conn, pipeline._now())
    assert (made["alert_id"], made["created_by"], made["reason"]) == (alert_id, "R. Nurse", "infusion cancelled")
    assert made["ends_at"] - made["starts_at"] == timedelta(days=7)
    (entry,) = [r for r in audit_rows(engine) if r["event"] == "silenced"]
    assert (entry["actor"], entry["alert_id"]) == ("web:R. Nurse", alert_id)


def test_dashboard_lists_silences_in_force_without_patient_id_or_reason(engine, settings, tmp_path):
    from bonewatch.dashboard import build

    hold = alert_row("004711", "RENAL_HOLD", "high")
    insert_alerts(engine, hold)
    at = datetime(2025, 6, 2, 9)
    with engine.begin() as conn:
        by_alert = silences.create(conn, alert_id=hold["alert_id"], duration=timedelta(days=3),
                                   reason="Mrs Example moved to hospice", by="R. Nurse", at=at)
        by_patient = silences.create(conn, patient_id="004711", rule="RENAL_HOLD", duration=timedelta(days=7),
                                     reason="Mrs Example moved to hospice", by="A. Nurse", at=at)
        silences.create(conn, patient_id="004711", duration=timedelta(hours=1), reason="expired by then",
                        by="X. Gone", at=at)
    index = build.build(engine, settings, tmp_path / "dash", now=datetime(2025, 6, 3, 9, tzinfo=UTC))
    html = index.read_text("utf-8")
    shown = html[html.index('id="silenced"'):]
    shown = shown[:shown.index("</table>")]
    assert f"<td>{by_alert['silence_id']}</td><td>alert {hold['alert_id']}</td>" in shown
    assert "<td>2025-06-05 09:00</td><td>R. Nurse</td>" in shown
    assert f"<td>{by_patient['silence_id']}</td><td>a patient, rule RENAL_HOLD</td>" in shown
    assert "<td>2025-06-09 09:00</td><td>A. Nurse</td>" in shown
    assert "X. Gone" not in html                                    # expired: not in force
    assert "004711" not in html and "Example" not in html and "hospice" not in html
