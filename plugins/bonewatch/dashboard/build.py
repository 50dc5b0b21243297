"""`bonewatch dashboard --out DIR`: the static data-quality dashboard and the GX Data Docs.

Reads what the nightly runs recorded (`dq_feed_nights`, `dq_nights`, `dq_validations`), renders
the pages (`bonewatch.dashboard.pages`) and lets GX build its Data Docs into `DIR/datadocs/`.
Everything the pages need is inside the files: they open from disk with no network.
"""

from __future__ import annotations

import logging
import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
from sqlalchemy import Connection, Engine, func, select

from bonewatch.config import Settings
from bonewatch.dashboard import metrics, pages
from bonewatch.dashboard.record import stored_nights
from bonewatch.ingest import codes as code_list
from bonewatch.store.tables import dq_feed_nights, dq_nights, dq_validations

log = logging.getLogger(__name__)

DATADOCS = "datadocs"


def default_folder(settings: Settings) -> Path:
    """`[quality] dashboard_dir`, else `<data dir>/dashboard`."""
    configured = settings.quality.dashboard_dir
    return Path(configured).expanduser().resolve() if configured else settings.data_dir / "dashboard"


PLACES_SHOWN = 3            # file and line examples a (feed, reason) row of the quarantine page shows
_PLACES_READ = 20_000       # quarantine rows read for them: a bad night can quarantine millions


def quarantine_places(conn: Connection, first: date, last: date) -> dict[tuple[str, str], list[str]]:
    """Where the window's quarantined rows are, per (feed, public reason): up to PLACES_SHOWN
    "file, line N" (latest nights first), so the data team can open the file at the right line.
    File names and line numbers only: the reasons are made public, the values never leave."""
    from bonewatch.ingest.parsing import public_reason
    from bonewatch.store.tables import deliveries, quarantine

    q, d = quarantine.c, deliveries.c
    rows = conn.execute(
        select(q.feed, q.reason, q.file_name, q.source_line)
        .select_from(quarantine.join(deliveries, d.delivery_id == q.delivery_id))
        .where(d.partition.between(first.isoformat(), last.isoformat()))
        .order_by(d.partition.desc(), q.file_name, q.source_line).limit(_PLACES_READ)).all()
    places: dict[tuple[str, str], list[str]] = {}
    for feed, reason, file_name, line in rows:
        shown = places.setdefault((feed, public_reason(reason)), [])
        if len(shown) < PLACES_SHOWN:
            shown.append(f"{file_name}, line {line}")
    return places


def silences_shown(conn: Connection, now: datetime) -> list[dict]:
    """The silences in force at `now`, as the dashboard shows them: id, what they match (an alert
    id, or "a patient" and the rule: never the patient id), how many alerts, until when (UTC), by
    whom. Not the reason: it is free text and can name someone (`bonewatch silences` shows it)."""
    from bonewatch.store import silences

    return [{"id": s["silence_id"], "matches": silences.matcher_text(s, with_patient=False),
             "alerts": len(s["alerts"]), "until": f"{silences.until(s):%Y-%m-%d %H:%M}", "by": s["created_by"]}
            for s in silences.list_silences(conn, metrics.as_naive_utc(now))]


def build(engine: Engine, settings: Settings, out: Path, *, now: datetime,
          through: date | None = None) -> Path:
    """Write the dashboard into `out` (its index.html, a page per feed, quarantine, validation
    runs, and `datadocs/`); return the path of index.html.

    In: the store, the settings, the folder, the clock (`now`, for the "built at" line) and the
    last night to show (default: the latest night a run recorded). The window is
    `[quality] window_nights` nights ending there.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with engine.connect() as conn:
        latest = conn.execute(select(func.max(dq_feed_nights.c.night))).scalar()
        latest = latest or conn.execute(select(func.max(dq_nights.c.night))).scalar()
        last = through or (pd.Timestamp(latest).date() if latest else None)
        nights: list[date] = []
        feed_rows = night_rows = pd.DataFrame()
        runs: list[dict] = []
        places: dict[tuple[str, str], list[str]] = {}
        # a local code may be a name or an MRN sent in a code field: masked (`bonewatch codes` shows it)
        codes = code_list.public_codes(code_list.load(conn, settings, everything=True), settings)
        silenced = silences_shown(conn, now)
        if last is not None:
            first = last - timedelta(days=settings.quality.window_nights - 1)
            nights = [first + timedelta(days=i) for i in range(settings.quality.window_nights)]
            feed_rows, night_rows = stored_nights(conn, first, last)
            places = quarantine_places(conn, first, last)
            runs = [dict(r) for r in conn.execute(
                select(dq_validations).where(dq_validations.c.night.between(first, last))
                .order_by(dq_validations.c.night, dq_validations.c.feed, dq_validations.c.delivery_id,
                          dq_validations.c.seq)).mappings()]

    docs = out / DATADOCS
    if docs.exists():
        shutil.rmtree(docs)   # runs that left the window leave the Data Docs too
    hrefs: dict[tuple[str, int], str] = {}
    if runs:
        from bonewatch.quality.datadocs import build_data_docs

        built = build_data_docs(docs, runs)
        hrefs = {k: f"{DATADOCS}/{v}" for k, v in built.items()}
    validations = [{"delivery_id": r["delivery_id"], "seq": r["seq"], "feed": r["feed"], "night": r["night"],
                    "success": bool(r["success"]), "evaluated": r["evaluated"], "failed": r["failed"],
                    "href": hrefs.get((r["delivery_id"], r["seq"]), "")} for r in runs]

    configured = list(settings.feed_rules)
    seen = sorted(set(feed_rows["feed"]) - set(configured)) if len(feed_rows) else []
    feeds = configured + [f for f in seen if f != metrics.UNREADABLE_FEED]
    if metrics.UNREADABLE_FEED in seen:
        feeds.append(metrics.UNREADABLE_FEED)
    data = pages.DashboardData(
        site=settings.site.name, timezone=settings.site.timezone,
        generated_at=metrics.local_hhmm(metrics.as_naive_utc(now), settings.tz),
        nights=nights, feeds=feeds,
        deadlines={name: feed.deadline for name, feed in settings.feed_rules.items()},
        feed_rows=feed_rows, night_rows=night_rows, validations=validations,
        thresholds=metrics.Thresholds.of(settings.quality),
        datadocs_index=f"{DATADOCS}/index.html" if hrefs else "", codes=codes, places=places,
        silenced=silenced)
    rendered = pages.render(data)
    for stale in out.glob("feed-*.html"):
        if stale.name not in rendered:
            stale.unlink()
    for name, html in rendered.items():
        (out / name).write_text(html, "utf-8")
    log.info("dashboard: %d file(s), %d validation run(s) in %s", len(rendered), len(validations), out)
    return out / "index.html"
