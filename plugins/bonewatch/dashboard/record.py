"""Imperative shell of data-quality monitoring: read one night from the store, let the core
(`bonewatch.dashboard.metrics`) judge it, write the metrics, and tell the data team about new
problems through the outbox.

`record_night` is called by `bonewatch.pipeline.quality_check` (the nightly run) after the night
was ingested and evaluated. Every write is an upsert keyed on the night, so a rerun changes
nothing; a problem is emailed once (`dq_problems` remembers it, the outbox key de-duplicates).
The email is only *queued* here: the one sender (`pipeline.notify`, the monitor DAG's send task,
`bonewatch notify`) delivers it, so two tasks never flush the outbox side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, or_, select

from bonewatch.config import Settings
from bonewatch.dashboard import metrics
from bonewatch.store.tables import (
    alerts,
    deliveries,
    dq_arrivals,
    dq_feed_nights,
    dq_nights,
    dq_problems,
    dq_validations,
    lab_results,
    quarantine,
)
from bonewatch.store.writes import _insert

log = logging.getLogger(__name__)

DATA_QUALITY = "data_quality"   # outbox kind of the data team's emails
_JSON_COLUMNS = ("quarantine_reasons", "units", "unit_switches", "distributions", "notes")


@dataclass
class QualitySummary:
    """What one night's check found (JSON-safe; no patient data)."""

    night: str = ""
    feeds: dict[str, str] = field(default_factory=dict)     # feed -> status
    rag: dict[str, str] = field(default_factory=dict)       # feed -> red/amber/green/grey
    problems: int = 0
    new_problems: int = 0
    emailed: int = 0                                        # problems in tonight's data-team email
    queued: int = 0                                         # data-team messages queued (one per address)
    validations: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def feed_rules(settings: Settings) -> tuple[dict[str, metrics.FeedRule], metrics.FeedRule]:
    """The configured feeds, and the rule for feeds that are not configured."""
    rules = {name: metrics.FeedRule(feed.deadline, feed.expected) for name, feed in settings.feed_rules.items()}
    return rules, metrics.FeedRule(settings.quality.default_deadline, expected=False)


def record_night(engine: Engine, settings: Settings, night: date, *, now: datetime,
                 files: Iterable[Path] = (), validations: Iterable[dict] = ()) -> QualitySummary:
    """Record night `night`'s data-quality metrics and email the data team about new problems.

    In: the store, the settings, the night, the run's clock `now`, the night's inbox files (their
    modification times are the arrival times when [quality] arrival = "file_mtime") and the GX
    results kept while they were ingested. Out: a QualitySummary.
    """
    now = metrics.as_naive_utc(now)
    summary = QualitySummary(night=night.isoformat())
    with engine.begin() as conn:
        resent = _record_arrivals(conn, night, files, settings.quality.arrival == "file_mtime",
                                  night_folder=settings.inbox / night.isoformat())
        summary.validations = _record_validations(conn, night, validations, now)
    with engine.connect() as conn:
        inputs = _load_inputs(conn, settings, night)
    rules, default_rule = feed_rules(settings)
    thresholds = metrics.Thresholds.of(settings.quality)
    assessed = metrics.assess_night(night, feeds=rules, default_rule=default_rule, thresholds=thresholds,
                                    tz=settings.tz, now=now, resent=resent, **inputs["night"])
    volume = metrics.alert_volume(inputs["alerts"], night)
    latency = metrics.ack_latency(inputs["alerts"])
    unreadable = assessed.unreadable_files
    with engine.begin() as conn:
        _write_night(conn, night, assessed.rows, volume, latency, unreadable, now)
        known = {(r.feed, r.issue) for r in conn.execute(
            select(dq_problems.c.feed, dq_problems.c.issue).where(dq_problems.c.night == night))}
    new = [p for p in assessed.problems if (p.feed, p.issue) not in known]
    to_email = metrics.pageable(new, assessed.rows, now, thresholds)
    key = None
    if to_email:
        key, summary.queued = _queue_email(engine, settings, night, to_email)
    if new:
        emailed = {(p.feed, p.issue) for p in to_email}
        with engine.begin() as conn:
            conn.execute(_insert(conn, dq_problems).on_conflict_do_nothing(
                index_elements=["night", "feed", "issue"]), [
                {"night": night, "feed": p.feed, "issue": p.issue, "severity": p.severity, "text": p.text,
                 "found_at": now, "message_key": key if (p.feed, p.issue) in emailed else None}
                for p in new])
    summary.feeds = {r["feed"]: r["status"] for r in assessed.rows}
    summary.rag = {r["feed"]: r["rag"] for r in assessed.rows}
    summary.problems, summary.new_problems, summary.emailed = len(assessed.problems), len(new), len(to_email)
    log.info("data quality %s: %s; %d new problem(s), %d emailed to the data team", night,
             ", ".join(f"{f} {s}" for f, s in summary.feeds.items()) or "no feeds", len(new), len(to_email))
    return summary


# ---- writes ------------------------------------------------------------------------------------

def _record_arrivals(conn: Connection, night: date, files: Iterable[Path], use_mtime: bool, *,
                     night_folder: Path) -> pd.DataFrame:
    """Record the first-seen modification time of each of the night's files, by delivery (content
    hash; a re-run after the file was touched again keeps the original arrival). Return the files
    of the night's own folder that the ledger had already loaded for another night (feed, night,
    rows_total, arrived_at): they arrived, but nothing new came with them. (Loose files in the
    inbox are offered to every night, so they never count as re-sent.)"""
    from bonewatch.ingest.reader import file_digest

    seen, own = {}, set()
    for path in files:
        path = Path(path)
        try:
            if not path.is_file():
                continue
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None, microsecond=0)
            digest = file_digest(path)
        except OSError:      # gone or unreadable since it was listed: ingest reported it
            continue
        seen[digest] = mtime
        if path.resolve().is_relative_to(night_folder.resolve()):
            own.add(digest)
    ledger = conn.execute(select(deliveries.c.delivery_id, deliveries.c.feed, deliveries.c.partition,
                                 deliveries.c.rows_total, deliveries.c.received_at, deliveries.c.status)
                          .where(deliveries.c.delivery_id.in_(list(seen)))).all() if seen else []
    mine = [r for r in ledger if r.partition == night.isoformat()]
    if use_mtime and mine:
        conn.execute(_insert(conn, dq_arrivals).on_conflict_do_nothing(index_elements=["delivery_id"]), [
            {"delivery_id": r.delivery_id, "arrived_at": seen[r.delivery_id], "basis": "file_mtime"} for r in mine])
    again = [{"feed": r.feed, "night": r.partition or "backfill", "rows_total": int(r.rows_total),
              "arrived_at": seen[r.delivery_id]}   # tonight's file, whatever the arrival basis
             for r in ledger if r.partition != night.isoformat() and r.status == "loaded" and r.delivery_id in own]
    return pd.DataFrame(again, columns=["feed", "night", "rows_total", "arrived_at"])


def _record_validations(conn: Connection, night: date, kept: Iterable[dict], now: datetime) -> int:
    rows, seq = [], {}
    for item in kept:
        if not item.get("delivery_id"):
            continue
        result = item["result"]
        stats = result.get("statistics") or {}
        seq[item["delivery_id"]] = seq.get(item["delivery_id"], 0) + 1
        rows.append({"delivery_id": item["delivery_id"], "seq": seq[item["delivery_id"]], "feed": item["kind"],
                     "night": night, "suite": str(result.get("suite_name") or item["kind"])[:64],
                     "success": bool(result.get("success")),
                     "evaluated": int(stats.get("evaluated_expectations") or 0),
                     "failed": int(stats.get("unsuccessful_expectations") or 0),
                     "validated_at": now, "result": json.dumps(result, sort_keys=True, default=str)})
    if rows:
        conn.execute(_insert(conn, dq_validations).on_conflict_do_nothing(
            index_elements=["delivery_id", "seq"]), rows)
    return len(rows)


def _write_night(conn: Connection, night: date, rows: list[dict], volume: dict, latency: dict,
                 unreadable: int, now: datetime) -> None:
    """Replace the night's rows (delete + insert in the caller's transaction: a rerun is a no-op
    in effect, and a feed that vanished from the night does not linger)."""
    conn.execute(delete(dq_feed_nights).where(dq_feed_nights.c.night == night))
    if rows:
        conn.execute(dq_feed_nights.insert(), [
            {**{k: v for k, v in r.items() if k not in _JSON_COLUMNS},
             **{k: json.dumps(r[k], sort_keys=True, default=str) for k in _JSON_COLUMNS},
             "recorded_at": now} for r in rows])
    stmt = _insert(conn, dq_nights)
    stmt = stmt.on_conflict_do_update(index_elements=["night"], set_={
        c: stmt.excluded[c] for c in ("alerts_raised", "alerts_by_rule", "ack_latency", "unreadable_files",
                                      "recorded_at")})
    conn.execute(stmt, [{"night": night, "alerts_raised": sum(volume.values()),
                         "alerts_by_rule": json.dumps(volume, sort_keys=True),
                         "ack_latency": json.dumps(latency, sort_keys=True),
                         "unreadable_files": unreadable, "recorded_at": now}])


def _queue_email(engine: Engine, settings: Settings, night: date,
                 problems: list[metrics.Problem]) -> tuple[str, int]:
    """One data-team email for the night's new problems; its key names exactly those problems, so
    a rerun queues nothing twice. Returns the key and how many messages were new."""
    from bonewatch.notify import outbox

    ids = sorted(f"{p.feed}/{p.issue}" for p in problems)
    key = f"dq:{night.isoformat()}:{hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}"
    notice = metrics.data_team_notice(night, problems, settings.site.name, settings.quality.dashboard_hint)
    added = outbox.queue_message(engine, kind=DATA_QUALITY, recipients=list(settings.recipients.data_team),
                                 night=night, subject=notice.subject, text=notice.text, html=notice.html, key=key)
    return key, added


# ---- reads (bulk SQL) --------------------------------------------------------------------------

def _load_inputs(conn: Connection, settings: Settings, night: date) -> dict:
    """Everything the core needs for one night, in a handful of queries."""
    part = night.isoformat()
    d, a = deliveries.c, dq_arrivals.c
    night_deliveries = pd.DataFrame(conn.execute(
        select(d.delivery_id, d.feed, d.status, func.coalesce(a.arrived_at, d.received_at).label("arrived_at"),
               d.rows_total, d.rows_accepted, d.rows_quarantined, d.rows_not_monitored, d.expectations_passed,
               d.expectations_failed, d.units)
        .select_from(deliveries.outerjoin(dq_arrivals, a.delivery_id == d.delivery_id))
        .where(d.partition == part)).mappings().all(),
        columns=["delivery_id", "feed", "status", "arrived_at", "rows_total", "rows_accepted",
                 "rows_quarantined", "rows_not_monitored", "expectations_passed", "expectations_failed", "units"])
    if settings.quality.arrival == "ingested":
        received = dict(conn.execute(select(d.delivery_id, d.received_at).where(d.partition == part)).all())
        night_deliveries["arrived_at"] = night_deliveries["delivery_id"].map(received)
    reasons = pd.DataFrame(conn.execute(
        select(quarantine.c.feed, quarantine.c.reason, func.count().label("rows"))
        .select_from(quarantine.join(deliveries, d.delivery_id == quarantine.c.delivery_id))
        .where(d.partition == part).group_by(quarantine.c.feed, quarantine.c.reason)).all(),
        columns=["feed", "reason", "rows"])
    r = lab_results.c
    values = pd.DataFrame(conn.execute(
        select(d.feed, r.analyte, r.value)
        .select_from(lab_results.join(deliveries, d.delivery_id == r.delivery_id))
        .where(d.partition == part, r.analyte.in_(metrics.KEY_ANALYTES), r.censor == "",
               r.status != "cancelled")).all(), columns=["feed", "analyte", "value"])

    history = settings.quality.history_nights
    first = (night - timedelta(days=history)).isoformat()
    # Unit history: the window's nights, plus deliveries loaded outside any night (backfills such
    # as the initial history), which show what the feed has always sent.
    unit_rows = conn.execute(
        select(d.feed, d.partition, d.units)
        .where(d.status == "loaded", or_(d.partition.is_(None),
                                         and_(d.partition >= first, d.partition < part),
                                         ~d.partition.like("____-__-__")))).all()
    unit_history: dict[str, list] = {}
    for feed, _partition, units in unit_rows:
        unit_history.setdefault(feed, []).append(units)
    units_by_feed = {feed: metrics.merge_units(docs) for feed, docs in unit_history.items()}

    p50: dict[str, dict[str, list[float]]] = {}
    for feed, dists in conn.execute(
            select(dq_feed_nights.c.feed, dq_feed_nights.c.distributions)
            .where(dq_feed_nights.c.night >= night - timedelta(days=history), dq_feed_nights.c.night < night)):
        for analyte, stats in json.loads(dists).items():
            if stats.get("p50") is not None:
                p50.setdefault(feed, {}).setdefault(analyte, []).append(stats["p50"])

    window = settings.quality.window_nights
    al = alerts.c
    alert_rows = pd.DataFrame(conn.execute(
        select(al.rule, al.raised_on, al.severity, al.notified_at, al.acknowledged_at)
        .where(al.raised_on > night - timedelta(days=window), al.raised_on <= night)).all(),
        columns=["rule", "raised_on", "severity", "notified_at", "acknowledged_at"])
    return {"night": {"deliveries": night_deliveries, "reasons": reasons, "values": values,
                      "unit_history": units_by_feed, "p50_history": p50},
            "alerts": alert_rows}


def stored_nights(conn: Connection, first: date, last: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recorded dq_feed_nights and dq_nights rows of [first, last], JSON columns parsed."""
    feed_rows = pd.DataFrame(conn.execute(
        select(dq_feed_nights).where(dq_feed_nights.c.night.between(bindparam("a"), bindparam("b"))),
        {"a": first, "b": last}).mappings().all(), columns=[c.name for c in dq_feed_nights.columns])
    for column in _JSON_COLUMNS:
        feed_rows[column] = feed_rows[column].map(json.loads) if len(feed_rows) else feed_rows[column]
    night_rows = pd.DataFrame(conn.execute(
        select(dq_nights).where(dq_nights.c.night.between(bindparam("a"), bindparam("b"))),
        {"a": first, "b": last}).mappings().all(), columns=[c.name for c in dq_nights.columns])
    for column in ("alerts_by_rule", "ack_latency"):
        night_rows[column] = night_rows[column].map(json.loads) if len(night_rows) else night_rows[column]
    for frame in (feed_rows, night_rows):
        if len(frame):
            frame["night"] = pd.to_datetime(frame["night"]).dt.date
    return feed_rows, night_rows
