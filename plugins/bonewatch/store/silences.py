"""Silences: an alert (or a patient's alerts) muted for a stated time, with a reason.

Alertmanager's model, for the nurse who handled a finding outside bonewatch (the infusion was
cancelled, the patient moved to hospice care): a silence is its own record, not an alert status.
It matches one alert (`alert_id`), or a patient (`patient_id`, optionally one `rule`), which
covers that patient's alerts raised later while it holds too. It is *active* from `starts_at`
until `ends_at`, or until `ended_at` when someone unsilences it early.

While active, a matched alert is neither queued, emailed nor reminded (`bonewatch.notify.outbox`
asks `silenced_alerts`); its status does not change, so it was not acknowledged. Once the silence
has ended, the next notify run queues its alerts again if they are still live: an `open` alert
goes out as it would have, and a `notified` one is handed back by `release_ended`; a resolved or
acknowledged alert stays quiet.

Every silence made or ended lands in the audit table (`alert_audit`, events `silenced`,
`unsilenced`, `silence_ended`), one row per alert it matched then, without the patient id or the
reason (free text, which can name someone); `bonewatch silences` shows both from this table.
Times are naive UTC, passed in: these functions do not read the clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, update

from bonewatch.errors import NotFound, SilenceError
from bonewatch.store import audit
from bonewatch.store.tables import alerts, silences

# `14d`, `12h`, `2w`: one whole number and one unit, as Alertmanager's amtool writes them (its
# compound forms such as `1d12h` are not needed for nights and weeks, so they are refused).
_DURATION = re.compile(r"\s*([1-9][0-9]{0,4})\s*([hdw])\s*")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_LIVE = ("open", "notified")


def parse_duration(text: str, max_days: int) -> timedelta:
    """`14d` / `12h` / `2w` -> timedelta; SilenceError (one line) when it is not such a duration,
    or longer than `max_days` days."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        raise SilenceError(f"--for {text!r} is not a duration: write a whole number and h, d or w, "
                           "e.g. 12h, 14d, 2w")
    duration = int(match.group(1)) * _UNITS[match.group(2)]
    if duration > timedelta(days=max_days):
        raise SilenceError(f"--for {text.strip()} is longer than the {max_days} days a silence may last "
                           "([notify] silence_max_days); silence it again when it ends")
    return duration


def _clean(text: str | None, limit: int) -> str:
    return " ".join(str(text or "").split())[:limit]


def matches(silence: Mapping[str, Any], alert: Mapping[str, Any]) -> bool:
    """Does the silence's matcher match this alert (whatever the times)?"""
    if silence["alert_id"]:
        return silence["alert_id"] == alert["alert_id"]
    return silence["patient_id"] == alert["patient_id"] and (not silence["rule"] or silence["rule"] == alert["rule"])


def until(silence: Mapping[str, Any]) -> datetime:
    """When it stops (stopped) holding: its end, or when it was unsilenced if that came first."""
    ended = silence["ended_at"]
    return ended if ended is not None and ended < silence["ends_at"] else silence["ends_at"]


def state(silence: Mapping[str, Any], at: datetime) -> str:
    """active | ended (unsilenced early) | expired | pending (starts later), at that moment."""
    if silence["ended_at"] is not None and silence["ended_at"] <= at and silence["ended_at"] < silence["ends_at"]:
        return "ended"
    if silence["ends_at"] <= at:
        return "expired"
    return "pending" if silence["starts_at"] > at else "active"


def matcher_text(silence: Mapping[str, Any], *, with_patient: bool = True) -> str:
    """What it matches, in words (`with_patient=False`: without the patient id, for the audit)."""
    if silence["alert_id"]:
        return f"alert {silence['alert_id']}"
    who = f"patient {silence['patient_id']}" if with_patient else "a patient"
    return f"{who}, " + (f"rule {silence['rule']}" if silence["rule"] else "every rule")


def _active_clause(at: datetime):
    c = silences.c
    return and_(c.starts_at <= at, c.ends_at > at, or_(c.ended_at.is_(None), c.ended_at > at))


def _matched_alerts(conn: Connection, silence: Mapping[str, Any], statuses: Iterable[str]) -> list[dict]:
    c = alerts.c
    query = select(alerts).where(c.status.in_(list(statuses)))
    if silence["alert_id"]:
        query = query.where(c.alert_id == silence["alert_id"])
    else:
        query = query.where(c.patient_id == silence["patient_id"])
        if silence["rule"]:
            query = query.where(c.rule == silence["rule"])
    return [dict(r) for r in conn.execute(query.order_by(c.alert_id)).mappings()]


def create(conn: Connection, *, alert_id: str | None = None, patient_id: str | None = None,
           rule: str | None = None, duration: timedelta, reason: str, by: str, at: datetime,
           via: str = "cli") -> dict:
    """Make a silence from `at` for `duration` and audit it; returns its row (with `covers`: the
    unresolved alerts it matches now). One matcher: an alert id, or a patient (and a rule)."""
    reason, by = _clean(reason, 1000), _clean(by, 128)
    if not reason:
        raise SilenceError("a silence needs a reason (--reason): why is the alert handled outside bonewatch?")
    if not by:
        raise SilenceError("a silence needs the name of who silences it (--by)")
    if bool(alert_id) == bool(patient_id):
        raise SilenceError("silence either one alert (ALERT_ID) or a patient's alerts (--patient), not both")
    if rule and not patient_id:
        raise SilenceError("--rule narrows a --patient silence; an ALERT_ID already names its rule")
    if duration <= timedelta(0):
        raise SilenceError("a silence must last some time (--for)")
    if alert_id:
        exists = conn.execute(select(alerts.c.alert_id).where(alerts.c.alert_id == alert_id)).scalar()
        if exists is None:
            raise NotFound(f"no alert {alert_id}")
    row = {"alert_id": alert_id or None, "patient_id": patient_id or None, "rule": rule or None,
           "starts_at": at, "ends_at": at + duration, "reason": reason, "created_by": by, "created_at": at,
           "ended_at": None, "ended_by": None, "released_at": None}
    silence_id = conn.execute(insert(silences).values(**row).returning(silences.c.silence_id)).scalar_one()
    row["silence_id"] = silence_id
    covers = _matched_alerts(conn, row, ("open", "notified", "acknowledged"))
    detail = (f"silence {silence_id}: {matcher_text(row, with_patient=False)}, until "
              f"{row['ends_at']:%Y-%m-%d %H:%M} UTC")
    audit.record(conn, [audit.entry("silenced", actor=f"{via}:{by}", alert_id=a, at=at, detail=detail)
                        for a in ([a["alert_id"] for a in covers] or [None])])
    return {**row, "covers": [a["alert_id"] for a in covers]}


def end(conn: Connection, silence_id: int, *, by: str, at: datetime, via: str = "cli") -> dict:
    """Unsilence now (audited); returns the row as it is now. NotFound when there is no such
    silence; SilenceError when it had already ended or expired."""
    by = _clean(by, 128)
    if not by:
        raise SilenceError("unsilencing needs the name of who does it (--by)")
    row = conn.execute(select(silences).where(silences.c.silence_id == silence_id)).mappings().first()
    if row is None:
        raise NotFound(f"no silence {silence_id}")
    now_state = state(row, at)
    if now_state in ("ended", "expired"):
        raise SilenceError(f"silence {silence_id} has already {now_state} "
                           f"({until(row):%Y-%m-%d %H:%M} UTC): nothing to unsilence")
    changed = conn.execute(update(silences).where(silences.c.silence_id == silence_id, silences.c.ended_at.is_(None))
                           .values(ended_at=at, ended_by=by)).rowcount
    if not changed:
        raise SilenceError(f"silence {silence_id} has already ended: nothing to unsilence")
    row = {**dict(row), "ended_at": at, "ended_by": by}
    covers = _matched_alerts(conn, row, ("open", "notified", "acknowledged"))
    detail = f"silence {silence_id}: {matcher_text(row, with_patient=False)}, ended early"
    audit.record(conn, [audit.entry("unsilenced", actor=f"{via}:{by}", alert_id=a, at=at, detail=detail)
                        for a in ([a["alert_id"] for a in covers] or [None])])
    return row


def list_silences(conn: Connection, at: datetime, *, everything: bool = False) -> list[dict]:
    """Silences active at `at` (`everything`: also the ended and expired ones), newest first, each
    with `state` and `alerts` (the unresolved alerts it matches)."""
    query = select(silences).order_by(silences.c.starts_at.desc(), silences.c.silence_id.desc())
    if not everything:
        query = query.where(_active_clause(at))
    rows = [dict(r) for r in conn.execute(query).mappings()]
    for row in rows:
        row["state"] = state(row, at)
        row["alerts"] = [a["alert_id"] for a in _matched_alerts(conn, row, ("open", "notified", "acknowledged"))]
    return rows


def _active(conn: Connection, at: datetime, *, patient_ids: Iterable[str] | None = None,
            alert_ids: Iterable[str] | None = None) -> list[dict]:
    query = select(silences).where(_active_clause(at))
    if patient_ids is not None and alert_ids is not None:
        query = query.where(or_(silences.c.patient_id.in_(sorted(set(patient_ids))),
                                silences.c.alert_id.in_(sorted(set(alert_ids)))))
    return [dict(r) for r in conn.execute(query.order_by(silences.c.silence_id)).mappings()]


def silenced_alerts(conn: Connection, at: datetime, alert_rows: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    """Of these alerts (rows with alert_id, patient_id, rule), the ones an active silence matches
    at `at`: {alert_id: {until, reason, by, silence_id}} (the silence that holds longest)."""
    rows = list(alert_rows)
    if not rows:
        return {}
    active = _active(conn, at) if len(rows) > 500 else _active(
        conn, at, patient_ids=[r["patient_id"] for r in rows], alert_ids=[r["alert_id"] for r in rows])
    out: dict[str, dict] = {}
    for silence in active:
        for alert in rows:
            if matches(silence, alert):
                held = out.get(alert["alert_id"])
                if held is None or until(silence) > held["until"]:
                    out[alert["alert_id"]] = {"until": until(silence), "reason": silence["reason"],
                                              "by": silence["created_by"], "silence_id": silence["silence_id"]}
    return out


def active_for_patient(conn: Connection, patient_id: str, now: datetime) -> dict[str, dict]:
    """The alerts of this patient that an active silence matches at `now`:
    {alert_id: {until, reason, by, silence_id}} (for the CDS Hooks cards)."""
    rows = conn.execute(select(alerts.c.alert_id, alerts.c.patient_id, alerts.c.rule)
                        .where(alerts.c.patient_id == patient_id)).mappings().all()
    return silenced_alerts(conn, now, rows)


def release_ended(conn: Connection, at: datetime) -> list[dict]:
    """Silences that have ended by `at` and were not released yet: mark them released and return
    the `notified` alerts they matched that no other silence still holds (the caller queues them
    again; `open` ones are queued anyway). Audited as `silence_ended`, one row per silence."""
    c = silences.c
    ended = [dict(r) for r in conn.execute(
        select(silences).where(c.released_at.is_(None), or_(c.ends_at <= at, c.ended_at <= at))
        .order_by(c.silence_id)).mappings()]
    if not ended:
        return []
    back: dict[str, dict] = {}
    for silence in ended:
        for alert in _matched_alerts(conn, silence, ("notified",)):
            back[alert["alert_id"]] = alert
    still = silenced_alerts(conn, at, back.values())
    conn.execute(update(silences).where(c.silence_id.in_([s["silence_id"] for s in ended]),
                                        c.released_at.is_(None)).values(released_at=at))
    audit.record(conn, [audit.entry(
        "silence_ended", actor="outbox", at=at, detail=f"silence {s['silence_id']}: "
        f"{matcher_text(s, with_patient=False)}, {state(s, at)} {until(s):%Y-%m-%d %H:%M} UTC") for s in ended])
    return [alert for alert_id, alert in sorted(back.items()) if alert_id not in still]
