"""A real SMTP outage and a real refusal, driven through the `bonewatch notify` command: a second
aiosmtpd server that the test stops and starts again on the same port. Nothing is marked notified
before the server accepted it, nothing is lost, and after recovery every digest arrives exactly
once."""

from __future__ import annotations

from datetime import date

from bonewatch.notify.catcher import MailCatcher
from bonewatch.notify.outbox import message_id_for
from tests.integration.alerting import alert_row, alert_rows, audit_rows, free_port, insert_alerts, outbox_rows, run_cli

NIGHT = date(2025, 6, 5)
NURSES = "oncology-nurses@hospital.example"


def _cohort() -> list[dict]:
    return [alert_row("000123", "RENAL_HOLD", "high"), alert_row("000123", "REVIEW_1Y", "medium"),
            alert_row("000456", "DOSE_BAND", "high"), alert_row("000777", "ALP_RISE_BORTEZOMIB", "info")]


def _point_smtp_at(monkeypatch, port: int) -> None:
    monkeypatch.setenv("BONEWATCH_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(port))
    monkeypatch.setenv("BONEWATCH_SMTP_STARTTLS", "false")


def test_notify_during_an_outage_loses_nothing_and_delivers_once_after(engine, monkeypatch):
    rows = _cohort()
    insert_alerts(engine, *rows)
    port = free_port()
    _point_smtp_at(monkeypatch, port)
    server = MailCatcher(port=port).start()
    server.stop()                                   # the outage: nothing listens on the port

    down = run_cli("notify", "--night", NIGHT.isoformat())
    assert down.returncode == 1, down.stderr
    assert "0 message(s) sent, 1 left pending, 0 alert(s) notified" in down.stdout
    error_lines = down.stderr.strip().splitlines()
    assert len(error_lines) == 1 and "refused the connection" in error_lines[0] and NURSES in error_lines[0]
    assert not any(r["patient_id"] in down.stdout + down.stderr for r in rows)   # no MRN in the output
    assert {a["status"] for a in alert_rows(engine).values()} == {"open"}
    assert all(a["notified_at"] is None for a in alert_rows(engine).values())
    (queued,) = outbox_rows(engine)
    assert (queued["status"], queued["attempts"]) == ("pending", 1)
    assert "refused the connection" in queued["last_error"]

    # run again at once: the message waits out its back-off, still pending, still reported
    waiting = run_cli("notify", "--night", NIGHT.isoformat())
    assert waiting.returncode == 1
    assert "waiting out a back-off" in waiting.stdout and "waiting until" in waiting.stderr
    assert outbox_rows(engine)[0]["attempts"] == 1

    with MailCatcher(port=port) as back:            # the server is back, on the same address
        up = run_cli("notify", "--night", NIGHT.isoformat(), "--retry-now")
        assert up.returncode == 0, up.stderr
        assert "1 message(s) sent, 0 left pending, 4 alert(s) notified" in up.stdout
        again = run_cli("notify", "--night", NIGHT.isoformat(), "--retry-now")
        assert again.returncode == 0 and "0 message(s) sent" in again.stdout
        assert len(back.messages) == 1
        assert back.messages[0]["Message-ID"] == queued["message_id"] == message_id_for(NURSES, NIGHT)
        body = back.messages[0].get_body(("plain",)).get_content()
        assert all(body.count(r["alert_id"]) >= 1 for r in rows)
    assert {a["status"] for a in alert_rows(engine).values()} == {"notified"}
    assert outbox_rows(engine)[0]["status"] == "sent"
    sends = [(r["result"], r["to_status"]) for r in audit_rows(engine) if r["event"] == "send"]
    assert sends == [("failed", "pending"), ("accepted", "sent")]


def test_refused_recipient_stays_pending_and_gets_it_once_when_accepted(engine, monkeypatch, tmp_path):
    ward_a, ward_b = "ward-a@hospital.example", "ward-b@hospital.example"
    config = tmp_path / "bonewatch.toml"
    config.write_text(f'[recipients]\ndefault = ["{ward_a}", "{ward_b}"]\n', "utf-8")
    monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
    insert_alerts(engine, *_cohort())
    with MailCatcher() as server:
        _point_smtp_at(monkeypatch, server.port)
        server.refuse(ward_b)
        first = run_cli("notify", "--night", NIGHT.isoformat())
        assert first.returncode == 1
        assert "1 message(s) sent, 1 left pending, 4 alert(s) notified" in first.stdout
        assert ward_b in first.stderr and "550" in first.stderr
        assert [rcpts for _, rcpts in server.envelopes] == [[ward_a]]
        pending = {r["recipient"]: r for r in outbox_rows(engine)}
        assert (pending[ward_a]["status"], pending[ward_b]["status"]) == ("sent", "pending")
        assert "550" in pending[ward_b]["last_error"]

        server.refuse()                             # the mailbox is fixed
        second = run_cli("notify", "--night", NIGHT.isoformat(), "--retry-now")
        assert second.returncode == 0, second.stderr
        third = run_cli("notify", "--night", NIGHT.isoformat(), "--retry-now")
        assert third.returncode == 0 and "0 message(s) sent" in third.stdout
        assert sorted(rcpts[0] for _, rcpts in server.envelopes) == [ward_a, ward_b]
        assert len(server.messages) == 2
    assert {r["status"] for r in outbox_rows(engine)} == {"sent"}
