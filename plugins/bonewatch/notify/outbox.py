"""The outbox: messages are queued as rows, then sent; an alert is marked notified only after the
SMTP server accepted a message that carried it.

Three entry points, all safe to rerun:

- `queue_digests(engine, settings, night)` puts every open (never notified) alert, and every
  unacknowledged high-severity alert whose re-notify interval has passed, into one digest row per
  recipient for that night. Recipients come from the patient's care team (`[recipients.teams]`,
  the latest `care_team` event), else `[recipients] default`. An alert waits in at most one
  pending row per recipient, so a rerun, or the next night while an outage holds a row back,
  adds nothing twice. An alert an active silence matches (`bonewatch.store.silences`) is left
  out, reminders included; once the silence has ended its still-live alerts are queued again.
- `queue_message(engine, kind=..., recipients=..., night=..., subject=..., text=..., html=...,
  key=...)` queues a ready-made message (a data-quality notice to the data team), one row per
  recipient, idempotent on (kind, key, recipient). Its body is stored and sent as it is.
- `flush(engine, settings)` sends every pending row: digests re-rendered from the alert rows as
  they are now (with fresh signed acknowledgement links and trend charts), ready-made messages
  from their stored body. Only after the server's 250 to DATA does the row become `sent` and its
  alerts `notified`, in one transaction with their audit rows. A failure leaves everything
  pending with the error recorded and schedules the next try with exponential back-off; a `sent`
  row is never looked at again, so nothing accepted is sent twice.

Flushes may run at the same time (the DAG's send task, `bonewatch notify`, a retry on another
worker): each message is *claimed* before it is sent, with one conditional UPDATE (pending, not
claimed or its claim expired) that only one flush can win; the others leave it alone. A claim is
a lease (`[notify] claim_lease_s`): a flush killed while holding it lets the next flush take the
message over once it has expired. Queueing takes the `outbox` lock, so two queueing runs never
extend one row at once.

One gap no outbox closes: if the process dies between the server's acceptance and our commit
(milliseconds: the commit follows the 250 at once), the message is sent again once its claim has
expired, under the same Message-ID (clients that de-duplicate on it show it once). `make faults`
kills a flush exactly there and counts these separately.

Outbox row status: `pending` → `sent`, or `cancelled` when, by the time it could be sent, every
alert in it had been acknowledged, resolved or silenced (nothing left to tell; `last_error` says so).
A digest leaves out the alerts silenced by the time it goes out; they stay `open` or `notified`.
Every send attempt and every alert state change lands in `alert_audit`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, case, insert, or_, select, update

from bonewatch import faults
from bonewatch.config import Settings
from bonewatch.errors import AlertDeliveryError
from bonewatch.notify.charts import Trend, build_trends, family
from bonewatch.notify.render import render_digest
from bonewatch.notify.send import send_message
from bonewatch.notify.tokens import ack_link
from bonewatch.store import audit, locks, silences
from bonewatch.store.tables import alerts, clinical_events, lab_results, outbox
from bonewatch.store.writes import _insert

log = logging.getLogger(__name__)

DIGEST = "digest"
# Alerts a digest still carries when it finally goes out. `notified` stays in: with several
# recipients the first acceptance marks the alert notified, and the others must still get it.
_LIVE = ("open", "notified")
_CANCELLED_NOTE = "not sent: every alert in it was acknowledged, resolved or silenced before delivery"
_KIND = re.compile(r"[a-z][a-z0-9_]{0,15}")
_IN_CHUNK = 500


@dataclass
class FlushResult:
    """What one flush did. `errors` holds one line a message not delivered (recipient and SMTP
    reply or the back-off wait, never patient data)."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0               # pending, waiting out the back-off after a failed attempt
    alerts_notified: int = 0
    cancelled: int = 0
    elsewhere: int = 0              # claimed by another flush running now (it sends them)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- routing (pure) -------------------------------------------------------------------------

def recipients_for(patient_id: str, settings: Settings, team: str | None = None) -> list[str]:
    """Who gets this patient's alerts: the recipients of the patient's care team when
    `[recipients.teams]` names it (case-insensitive), else `[recipients] default`."""
    if team:
        wanted = team.strip().casefold()
        for name, addresses in settings.recipients.teams.items():
            if name.strip().casefold() == wanted and addresses:
                return list(addresses)
    return list(settings.recipients.default)


def care_teams(conn: Connection, patient_ids: Iterable[str], night: date) -> dict[str, str]:
    """Each patient's care team as of the night: the value of the latest `care_team` event on or
    before it. Patients without one are absent."""
    ids = sorted(set(patient_ids))
    e = clinical_events.c
    rows: list[tuple] = []
    for start in range(0, len(ids), _IN_CHUNK):
        rows += conn.execute(
            select(e.patient_id, e.value, e.occurred_at, e.event_key)
            .where(e.event_type == "care_team", e.occurred_date <= night,
                   e.patient_id.in_(ids[start:start + _IN_CHUNK]))).all()
    teams: dict[str, str] = {}
    for patient_id, value, _, _ in sorted(rows, key=lambda r: (r[0], r[2], r[3])):
        teams[patient_id] = value
    return teams


def message_id_for(recipient: str, night: date, kind: str = DIGEST, seq: int = 1) -> str:
    """The stable Message-ID of a recipient's digest for a night: a retry after an outage
    carries the same id. `seq` > 1 names a follow-up digest for the same night (alerts found, or
    reminders due, after that night's digest had already gone out)."""
    who = hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:12]
    part = "" if seq == 1 else f".{seq}"
    return f"<bonewatch.{kind}.{night.isoformat()}{part}.{who}@bonewatch>"


def message_id_for_key(kind: str, key: str, recipient: str) -> str:
    """The stable Message-ID of a ready-made message: one per (kind, key, recipient)."""
    who = hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:12]
    what = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"<bonewatch.{kind}.{what}.{who}@bonewatch>"


def backoff(settings: Settings, attempts: int) -> timedelta:
    """How long a message waits after its `attempts`-th failed attempt (1, 2, ...)."""
    seconds = settings.notify.retry_backoff_s * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, settings.notify.retry_backoff_max_s))


# ---- queueing -------------------------------------------------------------------------------

def queue_message(engine: Engine, *, kind: str, recipients: list[str], night: date, subject: str,
                  text: str, html: str | None, key: str) -> int:
    """Queue a ready-made message to each recipient; return how many rows were new (0 on a rerun).

    In: `kind` (lower-case word, at most 16 characters, not "digest", e.g. "data_quality"), the
    recipients (never the nurses: these are operational notices), the night it belongs to, the
    subject, the plain-text body and optionally an HTML body, and the caller's `key`, which makes
    the call idempotent: the same (kind, key, recipient) is queued once, whatever the body.
    `flush` sends it with the same guarantees as the digests.
    """
    if not _KIND.fullmatch(kind) or kind == DIGEST:
        raise ValueError(f"queue_message: kind must be a lower-case word of at most 16 characters, "
                         f"not {DIGEST!r}; got {kind!r}")
    if not key:
        raise ValueError("queue_message: key must not be empty")
    now = _utcnow()
    added = 0
    with engine.begin() as conn:
        for recipient in dict.fromkeys(r.strip() for r in recipients if r and r.strip()):
            message_id = message_id_for_key(kind, key, recipient)
            stmt = _insert(conn, outbox).values(
                message_id=message_id, recipient=recipient, night=night, kind=kind, alert_ids="[]",
                subject=subject, status="pending", attempts=0, created_at=now, message_key=key[:200],
                body_text=text, body_html=html,
            ).on_conflict_do_nothing().returning(outbox.c.message_id)
            # RETURNING, not rowcount: psycopg reports 1 for an INSERT that did nothing on conflict
            if conn.execute(stmt).first() is not None:
                added += 1
    log.info("outbox: %d %s message(s) queued for %s", added, kind, night.isoformat())
    return added


def queue_digests(engine: Engine, settings: Settings, night: date, *, silences_at: datetime | None = None) -> int:
    """Queue the open alerts, and the reminders due, into tonight's digest rows; return how many
    rows were created or extended (0 on a rerun).

    A pending row for the same recipient and night is extended with the new alerts; if that
    night's digest has already been sent, a follow-up row is created with its own Message-ID.
    Alerts an active silence matches at `silences_at` (the run's clock, naive UTC; default now)
    are left out; the notified alerts of silences that have ended since are queued again.
    """
    now = _utcnow()
    changed = 0
    with locks.hold(engine, "outbox", wait_s=settings.database.lock_wait_s), engine.begin() as conn:
        rows = list(conn.execute(
            select(alerts).where(alerts.c.status == "open").order_by(alerts.c.alert_id)
        ).mappings().all())
        due = _reminders_due(conn, settings, night)
        # back from a silence: sent before it, still live, and told again now that it has ended
        back = silences.release_ended(conn, silences_at or now)
        seen = {row["alert_id"] for row in rows + due}
        due += [row for row in back if row["alert_id"] not in seen]
        muted = silences.silenced_alerts(conn, silences_at or now, rows + due)
        rows = [row for row in rows + due if row["alert_id"] not in muted]
        if not rows:
            return 0
        reminders = {row["alert_id"] for row in due if row["alert_id"] not in muted}
        teams = care_teams(conn, (row["patient_id"] for row in rows), night)
        unmapped = sorted({t for t in teams.values()
                           if t.strip().casefold() not in {n.strip().casefold() for n in settings.recipients.teams}})
        if unmapped:
            # the names come from the events feed (feed text, anything can be in it): count them
            log.warning("%d care team(s) not in [recipients.teams]: sent to the default recipients",
                        len(unmapped))
        wanted: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            for recipient in recipients_for(row["patient_id"], settings, teams.get(row["patient_id"])):
                wanted.setdefault(recipient, []).append(row)

        existing = conn.execute(
            select(outbox.c.message_id, outbox.c.recipient, outbox.c.night, outbox.c.status,
                   outbox.c.alert_ids, outbox.c.claimed_until)
            .where(outbox.c.kind == DIGEST, outbox.c.recipient.in_(list(wanted)))
        ).mappings().all()

        for recipient in sorted(wanted):
            mine = [r for r in existing if r["recipient"] == recipient]
            # An alert already waiting in a pending row (an outage, a refusal) goes out with it,
            # never in a second message. Sent rows don't count: acceptance made their alerts
            # `notified`, so an `open` alert found in one was reopened by evaluate (same id, new
            # occurrence) and must reach the nurses again; a `notified` one here is a reminder.
            already = {aid for r in mine if r["status"] == "pending"
                       for aid in json.loads(r["alert_ids"])}
            new = [row for row in wanted[recipient] if row["alert_id"] not in already]
            if not new:
                continue
            tonight = [r for r in mine if r["night"] == night]
            # A row a flush is sending right now is not extended: its alerts would miss the
            # message being sent. The new alerts get a follow-up row instead.
            pending = next((r for r in tonight if r["status"] == "pending" and _unclaimed(r, now)), None)
            extended = 0
            if pending is not None:
                ids = json.loads(pending["alert_ids"]) + [row["alert_id"] for row in new]
                subject = render_digest(recipient, night, _alert_rows(conn, ids), settings,
                                        reminders=reminders).subject
                extended = conn.execute(
                    update(outbox)
                    .where(outbox.c.message_id == pending["message_id"], outbox.c.status == "pending",
                           _claim_free(now))
                    .values(alert_ids=json.dumps(ids), subject=subject)
                ).rowcount
            if not extended:
                conn.execute(insert(outbox).values(
                    message_id=message_id_for(recipient, night, DIGEST, seq=len(tonight) + 1),
                    recipient=recipient,
                    night=night,
                    kind=DIGEST,
                    alert_ids=json.dumps([row["alert_id"] for row in new]),
                    subject=render_digest(recipient, night, new, settings, reminders=reminders).subject,
                    status="pending",
                    attempts=0,
                    created_at=now,
                ))
            changed += 1
    log.info("outbox: %d digest(s) queued for %s (%d reminder(s) due)", changed, night.isoformat(),
             len(reminders))
    return changed


def _reminders_due(conn: Connection, settings: Settings, night: date) -> list[Mapping[str, Any]]:
    """Notified, unacknowledged alerts of the re-notify severities whose last digest is at least
    `renotify_interval_days` nights before this one. Acknowledged and resolved alerts never are."""
    interval = settings.notify.renotify_interval_days
    if interval <= 0 or not settings.notify.renotify_severities:
        return []
    c = alerts.c
    return list(conn.execute(
        select(alerts).where(c.status == "notified", c.severity.in_(list(settings.notify.renotify_severities)),
                             c.last_notified_night.is_not(None),
                             c.last_notified_night <= night - timedelta(days=interval))
        .order_by(c.alert_id)).mappings().all())


# ---- sending --------------------------------------------------------------------------------

def flush(engine: Engine, settings: Settings, *, now: datetime | None = None,
          retry_now: bool = False, silences_at: datetime | None = None) -> FlushResult:
    """Send every pending outbox row; return the counts and one error line a message not sent.

    Digests are re-rendered from the current alert rows (latest evidence; alerts acknowledged or
    resolved meanwhile are left out; each alert gets a fresh signed acknowledgement link when
    BONEWATCH_ACK_SECRET is set). On acceptance, in one transaction: the row becomes `sent`
    (sent_at, attempts + 1), its alerts that are still `open` become `notified`, every alert in
    it records this night as its last digest, and the audit gets the attempt and the changes.
    On failure: attempts + 1, last_error, next_attempt_at (back-off) and an audit row; the row
    and its alerts stay as they were. A row still inside its back-off is skipped (`deferred`)
    unless `retry_now`. `now` (naive UTC) defaults to the clock; tests pass it in. Alerts an
    active silence matches at `silences_at` (default `now`) are left out like acknowledged ones.
    """
    now = now or _utcnow()
    result = FlushResult()
    with engine.connect() as conn:
        pending = conn.execute(
            select(outbox).where(outbox.c.status == "pending")
            .order_by(outbox.c.night, outbox.c.created_at, outbox.c.message_id)
        ).mappings().all()
        all_ids = {aid for row in pending if row["kind"] == DIGEST for aid in json.loads(row["alert_ids"])}
        current = {row["alert_id"]: row for row in _alert_rows(conn, all_ids)}
        trends = _trends(conn, settings, pending, current)

    secret = settings.notify.ack_secret
    me = locks.describe("flush")
    lease = timedelta(seconds=settings.notify.claim_lease_s)
    if settings.site.phi_minimal and not secret and any(r["kind"] == DIGEST for r in pending):
        log.warning("BONEWATCH_ACK_SECRET is not set: the links in PHI-minimal digests are unsigned and "
                    "cannot acknowledge; use `bonewatch ack`")
    for row in pending:
        message_id, night = row["message_id"], row["night"]
        if not retry_now and row["next_attempt_at"] is not None and row["next_attempt_at"] > now:
            result.deferred += 1
            result.errors.append(f"{row['kind']} for {row['recipient']} (night {night.isoformat()}): "
                                 f"waiting until {row['next_attempt_at']:%Y-%m-%d %H:%M} UTC to retry "
                                 f"after {row['attempts']} failed attempt(s): {row['last_error']}")
            continue
        row = _claim(engine, message_id, me, now, lease, retry_now)
        if row is None:      # sent, cancelled or being sent by another flush since we looked
            result.elsewhere += 1
            continue
        faults.point("notify.claimed")
        live: list[Mapping[str, Any]] = []
        reminders: list[str] = []
        if row["kind"] == DIGEST:
            ids = json.loads(row["alert_ids"])
            with engine.connect() as conn:   # as they are now: acknowledged meanwhile, or added
                current.update({a["alert_id"]: a for a in _alert_rows(conn, ids)})
            live = [current[aid] for aid in ids if aid in current and current[aid]["status"] in _LIVE]
            if live:    # silenced since it was queued: left out, and it stays open or notified
                with engine.connect() as conn:
                    muted = silences.silenced_alerts(conn, silences_at or now, live)
                live = [a for a in live if a["alert_id"] not in muted]
            if not live:
                _cancel(engine, message_id, night, now)
                result.cancelled += 1
                continue
            reminders = [a["alert_id"] for a in live if a["status"] == "notified"
                         and a["last_notified_night"] is not None and a["last_notified_night"] < night]
            links = ({a["alert_id"]: ack_link(settings.site.ack_base_url, secret, a["alert_id"], a["raised_on"],
                                              issued_at=now) for a in live} if secret else {})
            digest = render_digest(row["recipient"], night, live, settings, links=links,
                                   trends=trends.get(night), reminders=reminders)
            subject, text, html, images = digest.subject, digest.text, digest.html, digest.images
        else:
            subject, text, html, images = row["subject"], row["body_text"] or "", row["body_html"], ()
        try:
            send_message(settings.smtp, row["recipient"], subject, text, html, message_id, images=images)
        except AlertDeliveryError as exc:
            _record_failure(engine, settings, row, str(exc), now)
            result.failed += 1
            result.errors.append(f"{row['kind']} for {row['recipient']} (night {night.isoformat()}): {exc}")
            log.warning("outbox: %s not sent: %s", message_id, exc)
            continue
        except BaseException:
            # not a refusal (a configuration error, an interrupt): the server has not accepted
            # it, so hand the message back now rather than make the next flush wait out the lease
            _release(engine, message_id, me)
            raise
        faults.point("notify.accepted")
        # straight after the 250: the window in which a death sends this message twice
        result.alerts_notified += _record_sent(engine, row, subject, [a["alert_id"] for a in live],
                                               set(reminders), now)
        result.sent += 1
        log.info("outbox: %s sent with %d alert(s)", message_id, len(live))
    return result


# ---- claims ------------------------------------------------------------------------------

def _claim_free(now: datetime):
    """SQL: nobody holds the row's claim (never claimed, or the lease has run out)."""
    return or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now)


def _unclaimed(row: Mapping[str, Any], now: datetime) -> bool:
    return row["claimed_until"] is None or row["claimed_until"] < now


def _claim(engine: Engine, message_id: str, me: str, now: datetime, lease: timedelta,
           retry_now: bool) -> Mapping[str, Any] | None:
    """Claim a pending message for this flush; return the row as it is now, or None when it was
    sent, cancelled, put into back-off or claimed by another flush since it was read.

    One conditional UPDATE decides: on PostgreSQL a second UPDATE of the row waits for the first
    to commit and re-checks the condition against the new row; SQLite runs writers one at a time.
    """
    conditions = [outbox.c.message_id == message_id, outbox.c.status == "pending", _claim_free(now)]
    if not retry_now:
        conditions.append(or_(outbox.c.next_attempt_at.is_(None), outbox.c.next_attempt_at <= now))
    with engine.begin() as conn:
        won = conn.execute(update(outbox).where(*conditions)
                           .values(claimed_by=me, claimed_until=now + lease)).rowcount
        if won != 1:
            return None
        return conn.execute(select(outbox).where(outbox.c.message_id == message_id)).mappings().one()


def _release(engine: Engine, message_id: str, me: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.message_id == message_id, outbox.c.claimed_by == me,
                                          outbox.c.status == "pending")
                     .values(claimed_by=None, claimed_until=None))


# ---- writes -------------------------------------------------------------------------------

def _record_sent(engine: Engine, row: Mapping[str, Any], subject: str, alert_ids: list[str],
                 reminders: set[str], now: datetime) -> int:
    """Mark the row sent, its still-open alerts notified and every alert in it last sent tonight,
    with their audit rows, together; return how many alerts became notified."""
    message_id, night, recipient = row["message_id"], row["night"], row["recipient"]
    c = alerts.c
    with engine.begin() as conn:
        done = conn.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status == "pending")
            .values(status="sent", sent_at=now, attempts=outbox.c.attempts + 1, next_attempt_at=None,
                    subject=subject, alert_ids=json.dumps(alert_ids), claimed_by=None, claimed_until=None)
        ).rowcount
        entries = [audit.entry("send", actor="outbox", message_id=message_id, night=night, at=now,
                               from_status="pending", to_status="sent" if done else None, result="accepted",
                               detail=f"to {recipient}, attempt {row['attempts'] + 1}")]
        marked = 0
        if alert_ids:
            before = dict(conn.execute(select(c.alert_id, c.status).where(c.alert_id.in_(alert_ids))).all())
            marked = conn.execute(
                update(alerts).where(c.alert_id.in_(alert_ids), c.status == "open")
                .values(status="notified", notified_at=now)
            ).rowcount
            conn.execute(
                update(alerts).where(c.alert_id.in_(alert_ids), c.status.in_(_LIVE))
                .values(notify_count=c.notify_count + 1,
                        last_notified_night=case(
                            (or_(c.last_notified_night.is_(None), c.last_notified_night < night), night),
                            else_=c.last_notified_night))
            )
            for alert_id in alert_ids:
                previous = before.get(alert_id)
                if previous not in _LIVE:
                    continue
                what = "reminder" if alert_id in reminders else "digest"
                entries.append(audit.entry("notified", actor="outbox", alert_id=alert_id, message_id=message_id,
                                           night=night, at=now, from_status=previous, to_status="notified",
                                           result="accepted", detail=f"{what} to {recipient}"))
        audit.record(conn, entries)
    return marked


def _record_failure(engine: Engine, settings: Settings, row: Mapping[str, Any], error: str,
                    now: datetime) -> None:
    attempts = row["attempts"] + 1
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.message_id == row["message_id"], outbox.c.status == "pending")
            .values(attempts=outbox.c.attempts + 1, last_error=error[:1000],
                    next_attempt_at=now + backoff(settings, attempts), claimed_by=None, claimed_until=None)
        )
        audit.record(conn, [audit.entry("send", actor="outbox", message_id=row["message_id"], night=row["night"],
                                        at=now, from_status="pending", to_status="pending", result="failed",
                                        detail=f"to {row['recipient']}, attempt {attempts}: {error}")])


def _cancel(engine: Engine, message_id: str, night: date, now: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status == "pending")
            .values(status="cancelled", last_error=_CANCELLED_NOTE, claimed_by=None, claimed_until=None)
        )
        audit.record(conn, [audit.entry("cancelled", actor="outbox", message_id=message_id, night=night, at=now,
                                        from_status="pending", to_status="cancelled", detail=_CANCELLED_NOTE)])


# ---- reads --------------------------------------------------------------------------------

def _alert_rows(conn, alert_ids) -> list[Mapping[str, Any]]:
    ids = sorted(set(alert_ids))
    rows: list[Mapping[str, Any]] = []
    for start in range(0, len(ids), _IN_CHUNK):
        rows += conn.execute(select(alerts).where(alerts.c.alert_id.in_(ids[start:start + _IN_CHUNK]))
                             ).mappings().all()
    return rows


def _trends(conn: Connection, settings: Settings, pending, current) -> dict[date, dict[str, list[Trend]]]:
    """Trend charts for the pending digests, per night: {night: {patient_id: [Trend]}}."""
    if settings.site.phi_minimal or not settings.notify.charts:
        return {}
    out: dict[date, dict[str, list[Trend]]] = {}
    for night in sorted({r["night"] for r in pending if r["kind"] == DIGEST}):
        rows = [current[aid] for r in pending if r["kind"] == DIGEST and r["night"] == night
                for aid in json.loads(r["alert_ids"]) if aid in current and family(current[aid]["rule"])]
        if not rows:
            continue
        scr, alp = load_trend_frames(conn, settings, {r["patient_id"] for r in rows}, night)
        out[night] = build_trends(list({r["alert_id"]: r for r in rows}.values()), scr, alp,
                                  settings.clinical.alp_uln)
    return out


def load_trend_frames(conn: Connection, settings: Settings, patient_ids: Iterable[str],
                      night: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Creatinine (with Cockcroft-Gault CrCl) and ALP of these patients over the chart window
    ending on the night, exact final/corrected values only: the data the charts draw."""
    from bonewatch.rules.derive import TIMELESS, USABLE, creatinine_clearance, same_instant

    ids = sorted(set(patient_ids))
    start = pd.Timestamp(night - timedelta(days=settings.notify.chart_days))
    # weights up to the weight window before the first creatinine feed its CrCl
    since = night - timedelta(days=settings.notify.chart_days + settings.clinical.weight_window_days)
    r, e = lab_results.c, clinical_events.c
    labs, events = [], []
    for first in range(0, len(ids), _IN_CHUNK):
        chunk = ids[first:first + _IN_CHUNK]
        labs.append(pd.read_sql(
            select(r.result_id, r.patient_id, r.analyte, r.value, r.censor, r.collected_at, r.collected_date)
            .where(r.patient_id.in_(chunk), r.analyte.in_(["creatinine", "alp", "weight"]),
                   r.collected_date >= since, r.collected_date <= night, r.status.in_(sorted(USABLE))), conn))
        # birth date and sex are timeless (SPEC 2.5): delivered after the night, they still hold for it
        events.append(pd.read_sql(
            select(e.patient_id, e.event_type, e.occurred_at, e.occurred_date, e.value)
            .where(e.patient_id.in_(chunk), or_(e.event_type.in_(list(TIMELESS)),
                                                (e.event_type == "weight_kg") & (e.occurred_date <= night))), conn))
    lab = pd.concat(labs, ignore_index=True)
    ev = pd.concat(events, ignore_index=True)
    for column in ("result_id", "patient_id", "analyte", "censor"):
        lab[column] = lab[column].fillna("").astype("str")
    for column in ("patient_id", "event_type", "value"):
        ev[column] = ev[column].fillna("").astype("str")
    lab["collected_at"] = pd.to_datetime(lab["collected_at"]).astype("datetime64[ns]")
    lab["collected_day"] = pd.to_datetime(lab["collected_date"]).astype("datetime64[ns]")
    ev["occurred_at"] = pd.to_datetime(ev["occurred_at"]).astype("datetime64[ns]")
    ev["day"] = pd.to_datetime(ev["occurred_date"]).astype("datetime64[ns]")
    # two results of one analyte at one instant: the chart draws the one the rules use, whatever the ids
    lab, _ = same_instant(lab, "collected_at", settings.tz)
    lab = lab.sort_values(["patient_id", "collected_at", "analyte"], kind="stable").reset_index(drop=True)
    ev = ev.sort_values(["patient_id", "occurred_at", "event_type"], kind="stable").reset_index(drop=True)
    scr = creatinine_clearance(lab, ev, settings)
    scr = scr[(scr["censor"] == "") & (scr["collected_day"] >= start)]
    alp = lab[(lab["analyte"] == "alp") & (lab["censor"] == "") & (lab["collected_day"] >= start)]
    return scr.reset_index(drop=True), alp.reset_index(drop=True)


def _utcnow() -> datetime:
    """Naive UTC, as every DateTime column of the store holds."""
    return datetime.now(UTC).replace(tzinfo=None)
