"""Replay: 90 consecutive nightly runs, and a fresh store that loads everything first and is then
evaluated once as of each of those nights, give identical alerts (ids, nights, states, evidence)."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings, with_overrides
from bonewatch.store import db
from bonewatch.store.tables import alerts

COLUMNS = ["alert_id", "patient_id", "rule", "rule_version", "episode", "observed_on", "raised_on", "last_seen_on",
           "resolved_on", "evidence", "action", "citation"]


def snapshot(settings) -> list[tuple]:
    engine = db.make_engine(settings.database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(*[alerts.c[c] for c in COLUMNS]).order_by(alerts.c.alert_id)).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_nightly_runs_equal_a_replay_of_past_nights(tmp_path, mailbox):
    feeds = tmp_path / "feeds"
    manifest = synth.generate(feeds, patients=24, seed=5, last_night=date(2025, 6, 30), nights=90)
    first = date.fromisoformat(manifest["first_night"])
    nights = [first + timedelta(days=i) for i in range(90)]
    base = load_settings()

    nightly = with_overrides(base, database__url=f"sqlite:///{tmp_path / 'nightly.db'}",
                             site__inbox=str(feeds / "inbox"))
    pipeline.engine_for(nightly, migrate=True)
    pipeline.ingest(nightly, [feeds / "history"])
    for night in nights:
        pipeline.nightly(nightly, night)

    replay = with_overrides(base, database__url=f"sqlite:///{tmp_path / 'replay.db'}")
    pipeline.engine_for(replay, migrate=True)
    pipeline.ingest(replay, [feeds / "history", feeds / "inbox"])
    for night in nights:
        pipeline.evaluate(replay, night)

    got, want = snapshot(replay), snapshot(nightly)
    assert len(want) >= 10
    assert got == want
