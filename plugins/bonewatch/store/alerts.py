"""Alert lifecycle in the store: findings of a night -> alerts keyed on (patient, rule, episode).

open -> notified -> acknowledged -> resolved. A finding seen again is the same alert (no new
email); an alert whose condition is gone as of the night is resolved; a resolved alert found again
on a later night is reopened (the condition recurred).
"""

from __future__ import annotations

import json
from datetime import date, datetime

from sqlalchemy import Connection, bindparam, select, update

from bonewatch.model import Finding, partition_of
from bonewatch.store import audit
from bonewatch.store.tables import alerts


def sync_findings(conn: Connection, findings: list[Finding], as_of: date,
                  patients: set[str] | None = None) -> tuple[int, int]:
    """Upsert tonight's findings; resolve what cleared. Returns (new alerts, resolved alerts).

    `patients`: the patients evaluated (incremental evaluation, a batch of it); only their alerts
    can clear. None: every patient was evaluated. See `see_unchanged` for everyone else's."""
    import pandas as pd  # here, not above: a rerun's `see_unchanged` needs no data stack

    from bonewatch.store.writes import _insert

    c = alerts.c
    query = select(c.alert_id, c.patient_id, c.status, c.raised_on, c.last_seen_on, c.resolved_on)
    if patients is not None and len(patients) <= 10_000:   # a batch: read only its alerts
        query = query.where(c.patient_id.in_(sorted(patients)))
    existing = pd.read_sql(query, conn)
    existing = existing.set_index("alert_id")
    found = {f.alert_id: f for f in findings}
    new_rows, seen_rows, reopen_rows = [], [], []
    for alert_id, f in found.items():
        payload = {"b_id": alert_id, "rule_version": f.rule_version, "severity": f.severity.value,
                   "action": f.action, "citation": f.citation,
                   "evidence": json.dumps(f.evidence, sort_keys=True, default=str)}
        if alert_id not in existing.index:
            new_rows.append({"alert_id": alert_id, "patient_id": f.patient_id, "rule": f.rule,
                             "rule_version": f.rule_version, "severity": f.severity.value, "episode": f.episode,
                             "observed_on": f.observed_on, "raised_on": as_of, "last_seen_on": as_of,
                             "resolved_on": None, "action": f.action, "citation": f.citation,
                             "evidence": payload["evidence"], "status": "open"})
            continue
        row = existing.loc[alert_id]
        if row["status"] == "resolved":
            if row["resolved_on"] is not None and pd.Timestamp(as_of) > pd.Timestamp(row["resolved_on"]):
                reopen_rows.append({**payload, "b_seen": as_of})
            continue
        seen_rows.append({**payload, "b_seen": max(as_of, pd.Timestamp(row["last_seen_on"]).date()),
                          "b_raised": min(as_of, pd.Timestamp(row["raised_on"]).date())})
    if new_rows:
        conn.execute(_insert(conn, alerts).on_conflict_do_nothing(index_elements=["alert_id"]), new_rows)
    common = {"rule_version": bindparam("rule_version"), "severity": bindparam("severity"),
              "action": bindparam("action"), "citation": bindparam("citation"), "evidence": bindparam("evidence")}
    if seen_rows:
        conn.execute(update(alerts).where(c.alert_id == bindparam("b_id"))
                     .values(**common, last_seen_on=bindparam("b_seen"), raised_on=bindparam("b_raised")),
                     seen_rows)
    if reopen_rows:
        conn.execute(update(alerts).where(c.alert_id == bindparam("b_id"))
                     .values(**common, last_seen_on=bindparam("b_seen"), raised_on=bindparam("b_seen"),
                             resolved_on=None, status="open", notified_at=None,
                             acknowledged_by=None, acknowledged_at=None),
                     reopen_rows)
    unresolved = existing[(existing["status"] != "resolved")]
    if patients is not None:
        unresolved = unresolved[unresolved["patient_id"].isin(patients)]
    cleared = [a for a in unresolved.index
               if a not in found and pd.Timestamp(unresolved.loc[a, "raised_on"]) <= pd.Timestamp(as_of)]
    if cleared:
        conn.execute(update(alerts).where(c.alert_id.in_(cleared)).values(status="resolved", resolved_on=as_of))
    audit.record_sync(conn, as_of, [r["alert_id"] for r in new_rows], [r["b_id"] for r in reopen_rows],
                      {a: str(existing.loc[a, "status"]) for a in cleared})
    return len(new_rows) + len(reopen_rows), len(cleared)


def see_unchanged(conn: Connection, as_of: date, partition: tuple[int, int] | None = None) -> int:
    """After an incremental evaluation: the open alerts of the patients not evaluated were found
    again by construction (no new data, no due date), so they are seen tonight. Returns how many.
    `partition` (i, N): only the alerts of the patients of partition i of N (`model.partition_of`)."""
    c = alerts.c
    unseen = (c.status != "resolved", c.last_seen_on < as_of, c.raised_on <= as_of)
    if partition is None or partition[1] == 1:
        return conn.execute(update(alerts).where(*unseen).values(last_seen_on=as_of)).rowcount
    part, parts = partition
    # the partition's hash is computed here, not in SQL (SQLite has no SHA-256)
    ids = [a for a, patient in conn.execute(select(c.alert_id, c.patient_id).where(*unseen))
           if partition_of(patient, parts) == part]
    for start in range(0, len(ids), 5000):
        conn.execute(update(alerts).where(c.alert_id.in_(ids[start:start + 5000]), *unseen)
                     .values(last_seen_on=as_of))
    return len(ids)


def acknowledge(conn: Connection, alert_id: str, by: str, at: datetime, *, via: str = "cli") -> str:
    """Mark an alert acknowledged (and audit it, actor `<via>:<by>`); returns its previous status
    ('' when there is no such alert). Only an open or notified alert changes: the update is
    conditional, so of two acknowledgements racing, one wins and the other sees `acknowledged`."""
    c = alerts.c
    status = conn.execute(select(c.status).where(c.alert_id == alert_id)).scalar()
    if status is None:
        return ""
    if status in ("open", "notified"):
        changed = conn.execute(update(alerts).where(c.alert_id == alert_id, c.status.in_(("open", "notified")))
                               .values(status="acknowledged", acknowledged_by=by, acknowledged_at=at)).rowcount
        if not changed:
            return conn.execute(select(c.status).where(c.alert_id == alert_id)).scalar() or ""
        audit.record(conn, [audit.entry("acknowledged", actor=f"{via}:{by}", alert_id=alert_id, at=at,
                                        from_status=status, to_status="acknowledged")])
    return status


LISTED = ["alert_id", "patient_id", "rule", "rule_version", "severity", "raised_on", "action", "evidence",
          "status", "episode", "observed_on", "last_seen_on", "resolved_on", "citation", "notified_at",
          "acknowledged_by", "acknowledged_at", "last_notified_night", "notify_count"]


def list_alerts(conn: Connection, statuses: list[str] | None = None, alert_id: str | None = None) -> list[dict]:
    """Alerts as dicts (evidence parsed), urgent first, then by night and patient."""
    query = select(*[alerts.c[name] for name in LISTED])
    if statuses:
        query = query.where(alerts.c.status.in_(statuses))
    if alert_id is not None:
        query = query.where(alerts.c.alert_id == alert_id)
    rank = {"high": 0, "medium": 1, "info": 2}
    rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["evidence"] = json.loads(row["evidence"])
    return sorted(rows, key=lambda r: (rank.get(r["severity"], 9), str(r["raised_on"]), r["patient_id"], r["rule"]))


def latest_night(conn: Connection) -> date | None:
    import pandas as pd
    from sqlalchemy import func

    value = conn.execute(select(func.max(alerts.c.last_seen_on))).scalar()
    return None if value is None else pd.Timestamp(value).date()
