"""The outbox: tonight's digests are queued as rows, then sent; an alert is marked notified only
after the SMTP server accepted a message that carried it.

Two steps, both safe to rerun:

- `queue_digests(engine, settings, night)` puts every open (never notified) alert into one
  digest row per recipient for that night. An alert waits in at most one pending row per
  recipient, so a rerun, or the next night while an outage holds a row back, adds nothing twice.
- `flush(engine, settings)` sends every pending row, re-rendered from the alert rows as they are
  now, and only after the server's 250 to DATA marks the row `sent` and its alerts `notified`, in
  one transaction. A failure leaves everything pending with the error recorded; a `sent` row is
  never looked at again, so nothing accepted is sent twice.

One gap no outbox closes: if the store fails between the server's acceptance and our commit,
the next flush sends the same digest again, under the same Message-ID (clients that de-duplicate
on it show it once). Run one flush at a time (the DAG and the CLI do).

Outbox row status: `pending` → `sent`, or `cancelled` when, by the time it could be sent, every
alert in it had been acknowledged or resolved (nothing left to tell; `last_error` says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from bonewatch.config import Settings
from bonewatch.errors import AlertDeliveryError
from bonewatch.notify.render import render_digest
from bonewatch.notify.send import send_message
from bonewatch.store.tables import alerts, outbox

log = logging.getLogger(__name__)

DIGEST = "digest"
# Alerts a digest still carries when it finally goes out. `notified` stays in: with several
# recipients the first acceptance marks the alert notified, and the others must still get it.
_LIVE = ("open", "notified")
_CANCELLED_NOTE = "not sent: every alert in it was acknowledged or resolved before delivery"


@dataclass
class FlushResult:
    """What one flush did. `errors` holds one line a failed message (recipient and SMTP reply,
    never patient data)."""

    sent: int = 0
    failed: int = 0
    alerts_notified: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def recipients_for(patient_id: str, settings: Settings) -> list[str]:
    """Who gets this patient's alerts. For now everyone goes to `recipients.default`; care-team
    routing (`recipients.teams`, chosen by the patient's `care_team` event) will plug in here."""
    return list(settings.recipients.default)


def message_id_for(recipient: str, night: date, kind: str = DIGEST, seq: int = 1) -> str:
    """The stable Message-ID of a recipient's message of a kind for a night: a retry after an
    outage carries the same id. `seq` > 1 names a follow-up digest for the same night (alerts
    found after that night's digest had already gone out)."""
    who = hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:12]
    part = "" if seq == 1 else f".{seq}"
    return f"<bonewatch.{kind}.{night.isoformat()}{part}.{who}@bonewatch>"


def queue_digests(engine: Engine, settings: Settings, night: date) -> int:
    """Queue the open alerts into tonight's digest rows; return how many rows were created or
    extended (0 on a rerun).

    A pending row for the same recipient and night is extended with the new alerts; if that
    night's digest has already been sent, a follow-up row is created with its own Message-ID.
    """
    now = _utcnow()
    changed = 0
    with engine.begin() as conn:
        open_rows = conn.execute(
            select(alerts).where(alerts.c.status == "open").order_by(alerts.c.alert_id)
        ).mappings().all()
        if not open_rows:
            return 0
        wanted: dict[str, list[Mapping[str, Any]]] = {}
        for row in open_rows:
            for recipient in recipients_for(row["patient_id"], settings):
                wanted.setdefault(recipient, []).append(row)

        existing = conn.execute(
            select(outbox.c.message_id, outbox.c.recipient, outbox.c.night, outbox.c.status,
                   outbox.c.alert_ids)
            .where(outbox.c.kind == DIGEST, outbox.c.recipient.in_(list(wanted)))
        ).mappings().all()

        for recipient in sorted(wanted):
            mine = [r for r in existing if r["recipient"] == recipient]
            # An alert already waiting in a pending row (an outage, a refusal) goes out with it,
            # never in a second message. Sent rows don't count: acceptance made their alerts
            # `notified`, so an `open` alert found in one was reopened by evaluate (same id, new
            # occurrence) and must reach the nurses again.
            already = {aid for r in mine if r["status"] == "pending"
                       for aid in json.loads(r["alert_ids"])}
            new = [row for row in wanted[recipient] if row["alert_id"] not in already]
            if not new:
                continue
            tonight = [r for r in mine if r["night"] == night]
            pending = next((r for r in tonight if r["status"] == "pending"), None)
            if pending is not None:
                ids = json.loads(pending["alert_ids"]) + [row["alert_id"] for row in new]
                rows = _alert_rows(conn, ids)
                conn.execute(
                    update(outbox)
                    .where(outbox.c.message_id == pending["message_id"],
                           outbox.c.status == "pending")
                    .values(alert_ids=json.dumps(ids),
                            subject=render_digest(recipient, night, rows, settings).subject)
                )
            else:
                conn.execute(insert(outbox).values(
                    message_id=message_id_for(recipient, night, DIGEST, seq=len(tonight) + 1),
                    recipient=recipient,
                    night=night,
                    kind=DIGEST,
                    alert_ids=json.dumps([row["alert_id"] for row in new]),
                    subject=render_digest(recipient, night, new, settings).subject,
                    status="pending",
                    attempts=0,
                    created_at=now,
                ))
            changed += 1
    log.info("outbox: %d digest(s) queued for %s", changed, night.isoformat())
    return changed


def flush(engine: Engine, settings: Settings) -> FlushResult:
    """Send every pending outbox row; return the counts and one error line a failure.

    Each row is re-rendered from the current alert rows (latest evidence; alerts acknowledged or
    resolved meanwhile are left out). On acceptance, in one transaction: the row becomes `sent`
    (sent_at, attempts + 1) and its alerts that are still `open` become `notified` (notified_at).
    On failure: attempts + 1 and last_error; the row and its alerts stay as they were.
    """
    result = FlushResult()
    with engine.connect() as conn:
        pending = conn.execute(
            select(outbox).where(outbox.c.status == "pending")
            .order_by(outbox.c.night, outbox.c.created_at, outbox.c.message_id)
        ).mappings().all()
        all_ids = {aid for row in pending for aid in json.loads(row["alert_ids"])}
        current = {row["alert_id"]: row for row in _alert_rows(conn, all_ids)}

    for row in pending:
        message_id = row["message_id"]
        live = [current[aid] for aid in json.loads(row["alert_ids"])
                if aid in current and current[aid]["status"] in _LIVE]
        if not live:
            _cancel(engine, message_id)
            result.cancelled += 1
            continue
        digest = render_digest(row["recipient"], row["night"], live, settings)
        try:
            send_message(settings.smtp, row["recipient"], digest.subject, digest.text,
                         digest.html, message_id)
        except AlertDeliveryError as exc:
            _record_failure(engine, message_id, str(exc))
            result.failed += 1
            result.errors.append(f"digest for {row['recipient']} "
                                 f"(night {row['night'].isoformat()}): {exc}")
            log.warning("outbox: %s not sent: %s", message_id, exc)
            continue
        result.alerts_notified += _record_sent(engine, message_id, digest.subject,
                                               [a["alert_id"] for a in live])
        result.sent += 1
        log.info("outbox: %s sent with %d alert(s)", message_id, len(live))
    return result


# ---- writes -------------------------------------------------------------------------------

def _record_sent(engine: Engine, message_id: str, subject: str, alert_ids: list[str]) -> int:
    """Mark the row sent and its still-open alerts notified, together; return alerts marked."""
    now = _utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status == "pending")
            .values(status="sent", sent_at=now, attempts=outbox.c.attempts + 1,
                    subject=subject, alert_ids=json.dumps(alert_ids))
        )
        marked = conn.execute(
            update(alerts)
            .where(alerts.c.alert_id.in_(alert_ids), alerts.c.status == "open")
            .values(status="notified", notified_at=now)
        )
    return marked.rowcount


def _record_failure(engine: Engine, message_id: str, error: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status == "pending")
            .values(attempts=outbox.c.attempts + 1, last_error=error[:1000])
        )


def _cancel(engine: Engine, message_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status == "pending")
            .values(status="cancelled", last_error=_CANCELLED_NOTE)
        )


# ---- helpers ------------------------------------------------------------------------------

def _alert_rows(conn, alert_ids) -> list[Mapping[str, Any]]:
    ids = sorted(set(alert_ids))
    if not ids:
        return []
    return list(conn.execute(select(alerts).where(alerts.c.alert_id.in_(ids))).mappings().all())


def _utcnow() -> datetime:
    """Naive UTC, as every DateTime column of the store holds."""
    return datetime.now(UTC).replace(tzinfo=None)
