"""Re-notification: an unchanged finding on consecutive nights is sent once, re-sent only every
`[notify] renotify_interval_days` nights while nobody acknowledges it, and never again once
acknowledged (or resolved). Driven through the real nightly pipeline: ingest, rules, outbox, SMTP."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.notify.outbox import flush, queue_digests
from tests.integration.alerting import alert_row, alert_rows, ingest, insert_alerts, parts, run_cli, write_feeds

FIRST = date(2025, 6, 1)


def _renal_hold_history(settings, tmp_path) -> None:
    """One patient on zoledronic acid whose creatinine rose 0.6 mg/dL over a 0.9 baseline on
    2025-06-01 and stays there: a RENAL_HOLD that does not change from night to night."""
    write_feeds(tmp_path / "history", labs=[
        "000321,C1,2160-0,0.9,mg/dL,2025-04-01T08:00:00,final",
        "000321,C2,2160-0,1.5,mg/dL,2025-06-01T08:00:00,final",
    ], events=[
        "000321,diagnosis,2025-01-05,MM,C90.00",
        "000321,birth_date,1955-02-01,1955-02-01,",
        "000321,sex,2025-01-05,M,",
        "000321,dental_exam,2025-03-01,,",
        "000321,bisphosphonate_dose,2025-04-02T09:00:00,zoledronic_acid,4.0",
    ])
    ingest(settings, tmp_path / "history")


def _renal_messages(mailbox) -> list[tuple[str, str]]:
    """(subject, plain text) of every caught message that carries the RENAL_HOLD alert."""
    out = []
    for message in mailbox.messages:
        text = parts(message)[0]
        if "RENAL_HOLD" in text:
            out.append((message["Subject"], text))
    return out


def test_unchanged_finding_is_sent_once_then_reminded_per_interval_until_acknowledged(
        engine, settings, mailbox, tmp_path):
    _renal_hold_history(settings, tmp_path)
    cfg = load_settings()            # after `mailbox` pointed BONEWATCH_SMTP_* at the test server
    assert (cfg.notify.renotify_interval_days, cfg.notify.renotify_severities) == (2, ["high"])

    sent_on: dict[date, int] = {}
    for offset in range(5):                                   # 06-01 .. 06-05, nobody acknowledges
        night = FIRST + timedelta(days=offset)
        before = len(_renal_messages(mailbox))
        pipeline.nightly(cfg, night)
        sent_on[night] = len(_renal_messages(mailbox)) - before
    assert sent_on == {date(2025, 6, 1): 1, date(2025, 6, 2): 0, date(2025, 6, 3): 1,
                       date(2025, 6, 4): 0, date(2025, 6, 5): 1}
    renal = _renal_messages(mailbox)
    assert "REMINDER" not in renal[0][1] and "reminder" not in renal[0][0]
    for subject, text in renal[1:]:
        assert "(1 reminder)" in subject
        assert "REMINDER: sent before (last in the digest of" in text
    (hold,) = [a for a in alert_rows(engine).values() if a["rule"] == "RENAL_HOLD"]
    assert (hold["status"], hold["notify_count"], hold["last_notified_night"]) == ("notified", 3, date(2025, 6, 5))

    # the same night again sends nothing more
    pipeline.nightly(cfg, date(2025, 6, 5))
    assert len(_renal_messages(mailbox)) == 3

    done = run_cli("ack", hold["alert_id"], "--by", "R. Nurse")
    assert done.returncode == 0 and "acknowledged by R. Nurse" in done.stdout
    for offset in range(5, 8):                                # 06-06 .. 06-08: acknowledged, quiet
        pipeline.nightly(cfg, FIRST + timedelta(days=offset))
    assert len(_renal_messages(mailbox)) == 3
    assert alert_rows(engine)[hold["alert_id"]]["status"] == "acknowledged"


@pytest.mark.parametrize("interval, expected_nights", [(0, [1]), (1, [1, 2, 3, 4]), (3, [1, 4])])
def test_interval_is_configurable(engine, mailbox, interval, expected_nights):
    cfg = load_settings()
    cfg = cfg.model_copy(update={"notify": cfg.notify.model_copy(update={"renotify_interval_days": interval})})
    insert_alerts(engine, alert_row("000123", "RENAL_HOLD", "high", night=FIRST))
    got = []
    for offset in range(4):
        night = FIRST + timedelta(days=offset)
        before = len(mailbox.messages)
        queue_digests(engine, cfg, night)
        flush(engine, cfg)
        got += [night.day] * (len(mailbox.messages) - before)
    assert got == expected_nights


def test_only_unacknowledged_alerts_of_the_renotify_severities_are_reminded(engine, mailbox):
    cfg = load_settings()
    rows = {
        "high": alert_row("000001", "RENAL_HOLD", "high", night=FIRST),
        "medium": alert_row("000002", "REVIEW_1Y", "medium", night=FIRST),
        "acked": alert_row("000003", "DOSE_BAND", "high", night=FIRST),
        "resolved": alert_row("000004", "RENAL_HOLD", "high", night=FIRST),
    }
    insert_alerts(engine, *rows.values())
    queue_digests(engine, cfg, FIRST)
    assert flush(engine, cfg).alerts_notified == 4
    from sqlalchemy import update

    from bonewatch.store.tables import alerts
    with engine.begin() as conn:
        conn.execute(update(alerts).where(alerts.c.alert_id == rows["acked"]["alert_id"])
                     .values(status="acknowledged", acknowledged_by="R. Nurse"))
        conn.execute(update(alerts).where(alerts.c.alert_id == rows["resolved"]["alert_id"])
                     .values(status="resolved", resolved_on=FIRST + timedelta(days=1)))

    night = FIRST + timedelta(days=2)
    assert queue_digests(engine, cfg, night) == 1
    assert flush(engine, cfg).sent == 1
    text = parts(mailbox.messages[-1])[0]
    assert "MRN 000001" in text and "REMINDER" in text
    assert not any(f"MRN {pid}" in text for pid in ("000002", "000003", "000004"))
    assert queue_digests(engine, cfg, night) == 0          # rerun of the night: nothing more
