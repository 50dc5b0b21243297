"""`bonewatch demo`: a synthetic cohort through the whole pipeline on the embedded default.

SQLite store, a local SMTP catcher (aiosmtpd) that saves every email as an .eml file, one nightly
run per night; at the end it compares the alerts with the ground truth the generator planted.
"""

from __future__ import annotations

import json
import shutil
from datetime import date, timedelta
from pathlib import Path

from bonewatch import pipeline, synth
from bonewatch.config import Settings, with_overrides
from bonewatch.notify.catcher import MailCatcher


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
        )
        pipeline.engine_for(demo_settings, migrate=True)
        backfill = pipeline.ingest(demo_settings, [feeds / "history"], partition="history", progress=progress)
        first = date.fromisoformat(manifest["first_night"])
        totals = {"accepted": backfill.accepted, "quarantined": backfill.quarantined, "sent": 0}
        for offset in range(nights):
            night = first + timedelta(days=offset)
            result = pipeline.nightly(demo_settings, night)
            totals["accepted"] += result["ingest"]["accepted"]
            totals["quarantined"] += result["ingest"]["quarantined"]
            totals["sent"] += result["notify"]["sent"]
        emails = len(catcher.messages)
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
        f"  emails caught: {emails} (one digest per recipient per night with new alerts)",
        "",
        f"  emails (.eml, open with any mail client): {mail}",
        f"  alerts (JSON lines):                      {export}",
        f"  store (SQLite):                           {folder / 'bonewatch.db'}",
        f"  synthetic feeds and ground truth:         {feeds}",
        "  list them with: BONEWATCH_DATABASE_URL=sqlite:///" + str(folder / "bonewatch.db") + " .venv/bin/bonewatch alerts",
    ]
