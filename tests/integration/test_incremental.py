"""Incremental evaluation on both stores gives the same alerts as a full evaluation, night after
night: with the data arriving night by night (the normal run), and with every night's data loaded
up front (a backfill followed by a catch-up over past nights). Date-driven findings (reviews,
monitoring windows, course lapses) come from the evaluation index, not from new data.
"""

from __future__ import annotations

import json
from datetime import date, timedelta

from sqlalchemy import delete, func, select, update

from bonewatch import pipeline, synth
from bonewatch.store.tables import alert_audit, alerts, course_states, patient_index

COMPARED = ["alert_id", "patient_id", "rule", "rule_version", "severity", "episode", "observed_on", "raised_on",
            "last_seen_on", "resolved_on", "status", "action", "evidence"]


def alert_state(engine) -> dict[str, tuple]:
    """Every alert's stored fields. The evidence's free-text summary is left out: a summary may
    be worded from the night (URINE_ALBUMIN_DUE: "no result since <night - 6 months>"), and an
    alert is refreshed only on the nights its patient is evaluated. Its structured evidence
    (values, dates, baselines) is compared."""
    with engine.connect() as conn:
        rows = conn.execute(select(*[alerts.c[name] for name in COMPARED])).all()
    state = {}
    for r in rows:
        evidence = {k: v for k, v in json.loads(r.evidence).items() if k != "summary"}
        state[r.alert_id] = tuple(str(v) for v in r[:-1]) + (json.dumps(evidence, sort_keys=True),)
    return state


def forget_evaluations(engine) -> None:
    """Back to a store that holds the data but was never evaluated."""
    with engine.begin() as conn:
        for table in (alert_audit, alerts, course_states):
            conn.execute(delete(table))
        conn.execute(update(patient_index).values(evaluated_on=None, evaluated_with=None, next_due_on=None,
                                                  dirty_from=None))


def nights_of(manifest: dict) -> list[date]:
    first = date.fromisoformat(manifest["first_night"])
    return [first + timedelta(days=i) for i in range(manifest["nights"])]


def test_incremental_nights_give_the_alerts_of_full_evaluations(engine, settings, tmp_path):
    feeds = tmp_path / "feeds"
    manifest = synth.generate(feeds, patients=40, seed=5, last_night=date(2025, 6, 30), nights=14)
    nights = nights_of(manifest)
    inbox = feeds / "inbox"

    # 1. the normal run: each night's deliveries, then that night's incremental evaluation
    pipeline.ingest(settings, [feeds / "history"])
    evaluated = []
    states = []
    for night in nights:
        if (inbox / night.isoformat()).is_dir():
            pipeline.ingest(settings, [inbox / night.isoformat()])
        evaluated.append(pipeline.evaluate(settings, night).patients)
        states.append(alert_state(engine))
    assert evaluated[0] == manifest["patients"]          # the first night sees everyone
    assert min(evaluated[1:]) < manifest["patients"]     # later nights only the dirty and the due
    rerun = pipeline.evaluate(settings, nights[-1])
    assert rerun.patients == 0 and (rerun.new_alerts, rerun.resolved_alerts) == (0, 0)
    assert alert_state(engine) == states[-1]

    # 2. the same nights, every patient evaluated every night
    forget_evaluations(engine)
    for night, expected in zip(nights, states, strict=True):
        pipeline.evaluate(settings, night, full=True)
        assert alert_state(engine) == expected, f"full evaluation differs on {night}"

    # 3. a backfill then a catch-up: all data is in the store before the first night is evaluated
    forget_evaluations(engine)
    for night, expected in zip(nights, states, strict=True):
        pipeline.evaluate(settings, night)
        assert alert_state(engine) == expected, f"catch-up evaluation differs on {night}"

    with engine.connect() as conn:
        rules = set(conn.execute(select(alerts.c.rule)).scalars())
        planted = {json.loads(line)["rule"] for line in (feeds / "expected_alerts.jsonl").read_text().splitlines()}
    assert rules & {"REVIEW_1Y", "REVIEW_2Y"} and rules >= planted & rules


def test_a_due_date_wakes_a_patient_without_new_data(engine, settings, tmp_path):
    """A course's 12-month review falls on a night with no new data for the patient: the index
    wakes exactly that patient, and only on that night."""
    start = date(2024, 6, 10)
    labs = tmp_path / "labs.csv"
    events = tmp_path / "h.events.csv"
    labs.write_text("patient_id,result_id,loinc,value,unit,collected_at,status\n"
                    f"P1,s1,2160-0,0.9,mg/dL,{start - timedelta(days=2)},final\n"
                    f"P2,s2,2160-0,0.9,mg/dL,{start - timedelta(days=2)},final\n")
    events.write_text("patient_id,event_type,occurred_at,value,detail\n"
                      "P1,birth_date,2020-01-01,1950-01-01,\nP1,sex,2020-01-01,F,\nP1,weight_kg,2024-06-01,70,\n"
                      + "".join(f"P1,bisphosphonate_dose,{start + timedelta(days=28 * i)},zoledronic_acid,4.0\n"
                                for i in range(12)))
    pipeline.ingest(settings, [labs, events])
    due = date(2025, 6, 10)
    first = pipeline.evaluate(settings, due - timedelta(days=3))
    assert first.patients == 2 and "REVIEW_1Y" not in first.by_rule
    before = [pipeline.evaluate(settings, due - timedelta(days=d)) for d in (2, 1)]
    assert all("REVIEW_1Y" not in b.by_rule for b in before)
    on_due = pipeline.evaluate(settings, due)   # no data since the first evaluation: woken by the index
    assert on_due.by_rule.get("REVIEW_1Y") == 1 and on_due.new_alerts == 1
    assert pipeline.evaluate(settings, due).patients == 0     # the same night again: nobody is due
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(alerts).where(alerts.c.rule == "REVIEW_1Y")).scalar() == 1
