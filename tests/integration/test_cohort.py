"""A synthetic cohort goes through the store and the incremental nightly evaluation, and the alerts
are exactly the ground truth the generator planted (every rule, with near misses that must not fire).
Every 30th night and the last, the incremental store's open alerts and course states equal those of
a replay from scratch to that night (a second store with the same data, evaluated once as of it),
and after the last night a full evaluation of everyone changes nothing (issue 16).

`make test` runs 300 patients over 120 nights; `make acceptance` runs the same test at the scale of
issue 4, 2,000 patients over a year of nights (COHORT_SCALE=full; about 15 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import time
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings, with_overrides
from bonewatch.store import db
from bonewatch.store.tables import alerts
from tests.integration.test_incremental import alert_state, forget_evaluations
from tests.integration.test_state_equality import _course_states, _open_findings

SCALES = {"ci": (300, 120), "full": (2000, 365)}


@pytest.mark.xdist_group("cohort")
def test_a_cohort_over_many_nights_gives_exactly_the_planted_alerts(tmp_path):
    patients, nights = SCALES[os.environ.get("COHORT_SCALE", "ci")]
    feeds = tmp_path / "feeds"
    manifest = synth.generate(feeds, patients=patients, seed=2026, last_night=date(2025, 6, 30), nights=nights)
    settings = with_overrides(load_settings(), database__url=f"sqlite:///{tmp_path / 'cohort.db'}")
    pipeline.engine_for(settings, migrate=True)
    # One delivery per feed: this test is about a year of rule evaluation, not 730 small files.
    merged = tmp_path / "merged"
    merged.mkdir()
    for name in ("labs.csv", "events.csv"):
        parts = sorted(feeds.rglob(name))
        lines = [parts[0].read_text().splitlines()[0]]
        for part in parts:
            lines.extend(part.read_text().splitlines()[1:])
        target = merged / (name if name == "labs.csv" else "all.events.csv")
        target.write_text("\n".join(lines) + "\n")
    loaded = pipeline.ingest(settings, [merged])
    assert loaded.failed_files == 0 and loaded.quarantined == manifest["bad_rows"]
    replay = with_overrides(settings, database__url=f"sqlite:///{tmp_path / 'replay.db'}")
    replay_engine = pipeline.engine_for(replay, migrate=True)
    assert pipeline.ingest(replay, [merged]).failed_files == 0
    engine = db.make_engine(settings.database_url)
    first = date.fromisoformat(manifest["first_night"])
    started = time.perf_counter()
    replayed = 0
    for offset in range(manifest["nights"]):
        night = first + timedelta(days=offset)
        pipeline.evaluate(settings, night)
        if offset % 30 == 29 or offset == manifest["nights"] - 1:
            forget_evaluations(replay_engine)
            pipeline.evaluate(replay, night)
            assert _open_findings(replay_engine) == _open_findings(engine), f"replay differs on {night}"
            assert _course_states(replay_engine) == _course_states(engine), f"replay course states differ on {night}"
            replayed += 1
    print(f"{nights} nights evaluated in {time.perf_counter() - started:.0f} s")   # shown with -s; not asserted
    assert replayed == nights // 30 + (nights % 30 > 0)
    before = alert_state(engine)
    full = pipeline.evaluate(settings, night, full=True)
    assert full.patients == manifest["patients"] and (full.new_alerts, full.resolved_alerts) == (0, 0)
    assert alert_state(engine) == before
    engine.dispose()

    expected = {(e["patient_id"], e["rule"], e["raised_on"])
                for e in map(json.loads, (feeds / "expected_alerts.jsonl").read_text().splitlines())}
    with pipeline.engine_for(settings).connect() as conn:
        found = {(r.patient_id, r.rule, str(r.raised_on))
                 for r in conn.execute(select(alerts.c.patient_id, alerts.c.rule, alerts.c.raised_on))}
    scenario = manifest["patient_scenarios"]
    extra = sorted((scenario[p], r, d) for p, r, d in found - expected)
    missed = sorted((scenario[p], r, d) for p, r, d in expected - found)
    assert len({rule for _, rule, _ in expected}) == 15 and len(expected) > patients // 5
    assert extra == [], f"alerts nobody planted: {extra[:10]}"
    assert missed == [], f"planted findings missed: {missed[:10]}"
