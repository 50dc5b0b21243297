"""`bonewatch demo`: a synthetic cohort through the whole pipeline on the embedded default.

SQLite store, a local SMTP catcher (aiosmtpd) that saves every email as an .eml file, one nightly
run per night; at the end it compares the alerts with the ground truth the generator planted and
builds the data-quality dashboard.

Each night is replayed as if it ran live at 01:30 the next morning: the night's files get the
modification time of an on-time delivery (00:20), a feed with nothing that night sends a
header-only file (as real feeds do), and one delivery is simulated late so the dashboard and the
data team's email show what that looks like.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import date, datetime, time, timedelta
from pathlib import Path

from bonewatch import pipeline, synth
from bonewatch.config import Settings, with_overrides
from bonewatch.notify.catcher import MailCatcher

DEMO_ACK_SECRET = "bonewatch-demo-only-not-a-secret"


def run(settings: Settings, folder: Path, *, patients: int = 60, nights: int = 30,
        last_night: date = date(2025, 6, 30), seed: int = 7, progress: bool = False) -> list[str]:
    """Run the demo into `folder` (emptied first); return the lines to print."""
    folder = folder.resolve()
    if folder.exists():
        shutil.rmtree(folder)
    feeds, mail = folder / "feeds", folder / "mail"
    manifest = synth.generate(feeds, patients=patients, seed=seed, last_night=last_night, nights=nights)
    with MailCatcher(folder=mail) as catcher:
        demo_settings = with_overrides(
            settings,
            database__url=f"sqlite:///{folder / 'bonewatch.db'}",
            site__inbox=str(feeds / "inbox"),
            smtp__host="127.0.0.1", smtp__port=catcher.port, smtp__user="", smtp__starttls=False,
            # a demo-only key so the emails carry working acknowledgement links (see the last line)
            notify__ack_secret=DEMO_ACK_SECRET,
        )
        pipeline.engine_for(demo_settings, migrate=True)
        backfill = pipeline.ingest(demo_settings, [feeds / "history"], partition="history", progress=progress)
        first = date.fromisoformat(manifest["first_night"])
        totals = {"accepted": backfill.accepted, "quarantined": backfill.quarantined, "sent": 0}
        late_night = first + timedelta(days=max(nights - 4, 0))
        for offset in range(nights):
            night = first + timedelta(days=offset)
            clock = _deliver(feeds / "inbox" / night.isoformat(), night, demo_settings, late=night == late_night)
            result = pipeline.nightly(demo_settings, night, now=clock)
            totals["accepted"] += result["ingest"]["accepted"]
            totals["quarantined"] += result["ingest"]["quarantined"]
            totals["sent"] += result["notify"]["sent"]
        emails = len(catcher.messages)
        data_team = sum(1 for m in catcher.messages if "data quality" in str(m["Subject"]))
    from bonewatch.dashboard import build as dashboard

    dashboard_index = dashboard.build(pipeline.engine_for(demo_settings), demo_settings, folder / "dashboard",
                                      now=pipeline._now())
    from bonewatch.store import alerts as store_alerts

    with pipeline.engine_for(demo_settings).connect() as conn:
        rows = store_alerts.list_alerts(conn)
    export = folder / "alerts.jsonl"
    export.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows), "utf-8")
    expected = {(e["patient_id"], e["rule"], e["raised_on"])
                for e in map(json.loads, (feeds / "expected_alerts.jsonl").read_text("utf-8").splitlines())}
    found = {(r["patient_id"], r["rule"], str(r["raised_on"])) for r in rows}
    by_rule: dict[str, int] = {}
    for row in rows:
        by_rule[row["rule"]] = by_rule.get(row["rule"], 0) + 1
    return [
        f"bonewatch demo: {patients} synthetic patients, {nights} nights "
        f"({manifest['first_night']} to {manifest['last_night']})",
        f"  rows accepted: {totals['accepted']}, quarantined with a reason: {totals['quarantined']}",
        f"  alerts: {len(rows)} ({', '.join(f'{k} {v}' for k, v in sorted(by_rule.items()))})",
        f"  planted findings recovered: {len(expected & found)} of {len(expected)}; "
        f"unexpected alerts: {len(found - expected)}",
        f"  emails caught: {emails} (nurses: one digest per night with new alerts, plus reminders of unacknowledged urgent ones; "
        f"{data_team} data-quality email(s) to the data team)",
        "",
        f"  data-quality dashboard (opens offline):   {dashboard_index}",
        f"  emails (.eml, open with any mail client): {mail}",
        f"  alerts (JSON lines):                      {export}",
        f"  store (SQLite):                           {folder / 'bonewatch.db'}",
        f"  synthetic feeds and ground truth:         {feeds}",
        "  list them with: BONEWATCH_DATABASE_URL=sqlite:///" + str(folder / "bonewatch.db") + " .venv/bin/bonewatch alerts",
        "  open the emails' acknowledgement links: BONEWATCH_DATABASE_URL=sqlite:///" + str(folder / "bonewatch.db")
        + f" BONEWATCH_ACK_SECRET={DEMO_ACK_SECRET} .venv/bin/bonewatch serve",
        "  the same cohort as HL7 v2 or FHIR: .venv/bin/bonewatch synth --format hl7|fhir|ndjson --out DIR,"
        " then bonewatch ingest DIR/history",
    ]


def _deliver(folder: Path, night: date, settings: Settings, *, late: bool) -> datetime:
    """Make `<inbox>/<night>/` look as it would at the night's run, and return that run's clock.

    Every feed in `[feeds]` gets a file (header only when the generator had no rows for it that
    night); each file's modification time is its arrival: 00:20 local the next morning, or 02:47
    for the labs of the `late` night, whose run then happens at 03:05 instead of 01:30.
    """
    headers = {"labs": synth.LAB_HEADER, "events": synth.EVENT_HEADER}
    folder.mkdir(parents=True, exist_ok=True)
    morning = night + timedelta(days=1)
    for feed in settings.feeds:
        path = folder / f"{feed}.csv"
        if not path.exists() and feed in headers:
            path.write_text(",".join(headers[feed]) + "\n", "utf-8")
        arrival = time(2, 47) if late and feed == "labs" else time(0, 20)
        if path.exists():
            stamp = datetime.combine(morning, arrival, tzinfo=settings.tz).timestamp()
            os.utime(path, (stamp, stamp))
    return datetime.combine(morning, time(3, 5) if late else time(1, 30), tzinfo=settings.tz)
