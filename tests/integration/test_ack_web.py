"""The acknowledgement link, end to end: a digest sent through the real SMTP server carries a
signed link; the web app (`bonewatch serve`'s FastAPI app under uvicorn in a thread) opens it,
acknowledges that alert once, and refuses a tampered, expired or foreign token with a clear page.
An HTTP client (httpx) talks to the really running server."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update

from bonewatch.config import load_settings
from bonewatch.notify.outbox import flush, queue_digests
from bonewatch.notify.tokens import make_token
from bonewatch.store.tables import alerts
from bonewatch.web import create_app
from tests.integration.alerting import (
    SECRET,
    alert_row,
    alert_rows,
    audit_rows,
    insert_alerts,
    parts,
    run_cli,
    served,
)

NIGHT = date(2025, 6, 5)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@pytest.fixture
def site(engine, mailbox, monkeypatch):
    """Two alerts, one digest sent with signed links, and the app serving them: (base url, settings,
    {rule: alert id}, {rule: link from the email})."""
    monkeypatch.setenv("BONEWATCH_ACK_SECRET", SECRET)
    hold = alert_row("000123", "RENAL_HOLD", "high", evidence={"summary": "SCr 1.40 mg/dL, 0.50 above baseline"})
    band = alert_row("000456", "DOSE_BAND", "high", evidence={"summary": "CrCl 45.0 mL/min"})
    insert_alerts(engine, hold, band)
    settings = load_settings()
    with served(create_app(settings, engine=engine)) as base:
        # the emails point at where the app really runs
        settings = settings.model_copy(update={"site": settings.site.model_copy(update={"ack_base_url": base})})
        queue_digests(engine, settings, NIGHT)
        assert flush(engine, settings).sent == 1
        text = parts(mailbox.messages[0])[0]
        links = {aid: link for link, aid in re.findall(r"or open (\S+/alerts/(\w+)\?t=\S+)", text)}
        ids = {"RENAL_HOLD": hold["alert_id"], "DOSE_BAND": band["alert_id"]}
        assert set(links) == set(ids.values())
        yield base, settings, ids, {rule: links[aid] for rule, aid in ids.items()}


def _form_token(page: str) -> str:
    return re.search(r'name="t" value="([^"]+)"', page).group(1)


def test_link_from_the_email_acknowledges_its_alert_once(site, engine):
    base, _, ids, links = site
    hold = ids["RENAL_HOLD"]
    with httpx.Client() as client:
        shown = client.get(links["RENAL_HOLD"])
        assert shown.status_code == 200
        assert "Acknowledge this alert" in shown.text and "RENAL_HOLD" in shown.text
        assert shown.headers["cache-control"] == "no-store" and shown.headers["referrer-policy"] == "no-referrer"
        # opening the link (as a mail scanner would) changes nothing
        assert alert_rows(engine)[hold]["status"] == "notified"

        token = _form_token(shown.text)
        done = client.post(f"{base}/alerts/{hold}/ack", data={"t": token, "by": "R. Nurse"})
        assert done.status_code == 200 and "acknowledged by R. Nurse" in done.text
        row = alert_rows(engine)[hold]
        assert (row["status"], row["acknowledged_by"]) == ("acknowledged", "R. Nurse")
        assert alert_rows(engine)[ids["DOSE_BAND"]]["status"] == "notified"     # the other alert untouched

        again = client.post(f"{base}/alerts/{hold}/ack", data={"t": token, "by": "Someone Else"})
        assert again.status_code == 409 and "Already acknowledged" in again.text and "R. Nurse" in again.text
        assert client.get(links["RENAL_HOLD"]).status_code == 409
    assert alert_rows(engine)[hold]["acknowledged_by"] == "R. Nurse"
    (acked,) = [r for r in audit_rows(engine) if r["event"] == "acknowledged"]
    assert (acked["alert_id"], acked["actor"], acked["from_status"]) == (hold, "web:R. Nurse", "notified")


def test_tampered_expired_and_foreign_tokens_are_refused(site, engine):
    base, settings, ids, links = site
    hold, band = ids["RENAL_HOLD"], ids["DOSE_BAND"]
    token = links["RENAL_HOLD"].split("?t=", 1)[1]
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    expired = make_token(SECRET, hold, NIGHT, issued_at=_now() - timedelta(days=8))
    other_key = make_token("another-secret", hold, NIGHT, issued_at=_now())
    with httpx.Client() as client:
        cases = {
            "tampered": (client.get(f"{base}/alerts/{hold}", params={"t": tampered}), "Link not valid"),
            "other key": (client.get(f"{base}/alerts/{hold}", params={"t": other_key}), "Link not valid"),
            "expired": (client.get(f"{base}/alerts/{hold}", params={"t": expired}), "Link expired"),
            "missing": (client.get(f"{base}/alerts/{hold}"), "Link incomplete"),
            # the RENAL_HOLD link used on the DOSE_BAND alert
            "foreign": (client.get(f"{base}/alerts/{band}", params={"t": token}), "another alert"),
            "foreign post": (client.post(f"{base}/alerts/{band}/ack", data={"t": token, "by": "X"}),
                             "another alert"),
            "expired post": (client.post(f"{base}/alerts/{hold}/ack", data={"t": expired, "by": "X"}),
                             "Link expired"),
            "tampered post": (client.post(f"{base}/alerts/{hold}/ack", data={"t": tampered, "by": "X"}),
                              "Link not valid"),
        }
        for name, (response, words) in cases.items():
            assert response.status_code == 403, name
            assert words in response.text, name
            assert "<html" in response.text and "bonewatch" in response.text, name
            if "tampered" in name or "foreign" in name:
                assert "Nothing was acknowledged" in response.text, name
        nameless = client.post(f"{base}/alerts/{hold}/ack", data={"t": token, "by": "  "})
        assert nameless.status_code == 400 and "Enter your name" in nameless.text
        assert client.get(f"{base}/alerts/Anosuchalert0000", params={
            "t": make_token(SECRET, "Anosuchalert0000", NIGHT, issued_at=_now())}).status_code == 404
    assert {alert_rows(engine)[a]["status"] for a in (hold, band)} == {"notified"}
    assert not [r for r in audit_rows(engine) if r["event"] == "acknowledged"]


def test_link_of_an_earlier_occurrence_cannot_acknowledge_the_reopened_alert(site, engine):
    base, _, ids, links = site
    hold = ids["RENAL_HOLD"]
    with engine.begin() as conn:   # resolved, then found again on a later night: a new occurrence
        conn.execute(update(alerts).where(alerts.c.alert_id == hold)
                     .values(status="open", raised_on=date(2025, 6, 20), notified_at=None))
    token = links["RENAL_HOLD"].split("?t=", 1)[1]
    with httpx.Client() as client:
        refused = client.post(f"{base}/alerts/{hold}/ack", data={"t": token, "by": "R. Nurse"})
    assert refused.status_code == 403 and "earlier occurrence" in refused.text
    assert alert_rows(engine)[hold]["status"] == "open"


def test_serve_without_the_secret_fails_with_one_line(settings):
    done = run_cli("serve", "--port", "1")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "BONEWATCH_ACK_SECRET is not set" in done.stderr and "Traceback" not in done.stderr


def test_web_module_imports_without_side_effects():
    import importlib
    import sys

    sys.modules.pop("bonewatch.web", None)
    module = importlib.import_module("bonewatch.web")
    assert "fastapi" not in vars(module) and callable(module.create_app)
