"""The alert audit trail: every alert state change and every send attempt, append-only.

Rows say when (wall clock, UTC), for which night, what happened to which alert or message, who or
what did it (`evaluate`, `outbox`, `cli:<name>`, `web:<name>`) and the result. Alert ids are
opaque and recipients are mailbox addresses, so the table holds no patient identifier; SMTP
replies are kept to one short line.

Writers call `record(conn, rows)` inside their own transaction, so the audit row lands together
with the change it describes (or not at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from bonewatch.store.tables import alert_audit

COLUMNS = ("at", "night", "alert_id", "message_id", "event", "from_status", "to_status", "actor", "result",
           "detail")


def utcnow() -> datetime:
    """Naive UTC, as every DateTime column of the store holds (bookkeeping, never clinical logic)."""
    return datetime.now(UTC).replace(tzinfo=None)


def entry(event: str, *, actor: str, alert_id: str | None = None, message_id: str | None = None,
          from_status: str | None = None, to_status: str | None = None, result: str = "ok",
          detail: str | None = None, night: date | None = None, at: datetime | None = None) -> dict:
    """One audit row as a dict (pure apart from the default timestamp)."""
    return {"at": at or utcnow(), "night": night, "alert_id": alert_id, "message_id": message_id,
            "event": event, "from_status": from_status, "to_status": to_status, "actor": actor[:160],
            "result": result, "detail": None if detail is None else " ".join(str(detail).split())[:1000]}


def record(conn: Connection, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append audit rows (one bulk insert); returns how many."""
    rows = [dict(row) for row in rows]
    if rows:
        conn.execute(insert(alert_audit), rows)
    return len(rows)


def record_sync(conn: Connection, night: date, new: Iterable[str], reopened: Iterable[str],
                resolved: Mapping[str, str]) -> int:
    """The state changes one evaluation made: new alerts (-> open), reopened (resolved -> open),
    resolved ({alert_id: previous status} -> resolved). Called by `sync_findings`."""
    at = utcnow()
    rows = [entry("raised", actor="evaluate", alert_id=a, to_status="open", night=night, at=at) for a in new]
    rows += [entry("reopened", actor="evaluate", alert_id=a, from_status="resolved", to_status="open",
                   night=night, at=at) for a in reopened]
    rows += [entry("resolved", actor="evaluate", alert_id=a, from_status=str(previous), to_status="resolved",
                   night=night, at=at, detail="the condition is no longer found")
             for a, previous in resolved.items()]
    return record(conn, rows)


def history(conn: Connection, *, alert_id: str | None = None, message_id: str | None = None) -> list[dict]:
    """Audit rows of one alert or one message, oldest first."""
    query = select(alert_audit)
    if alert_id is not None:
        query = query.where(alert_audit.c.alert_id == alert_id)
    if message_id is not None:
        query = query.where(alert_audit.c.message_id == message_id)
    return [dict(r) for r in conn.execute(query.order_by(alert_audit.c.audit_id)).mappings()]
