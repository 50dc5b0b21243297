"""Incremental nights equal a replay from scratch and a full evaluation, on both stores, on
generated histories with late results, corrections, cancellations, doses, stops, therapy starts
and demographics (issue 16).

Hypothesis draws a few patients' histories; each row has the night its delivery arrives (the
history load before the first night, or one of the nights). Rows collected before a night that
was already evaluated arrive late; a result may be corrected (same result id, new value) or
cancelled in a later delivery. Three stores take the same deliveries:

- the incremental store evaluates each night as the pipeline does (`evaluate`);
- the full store evaluates every patient every night (`evaluate(full=True)`): its alerts (ids,
  nights, states, structured evidence) and course states must equal the incremental store's;
- a replay store is emptied, loaded with every delivery up to the night and evaluated once as of
  that night: its alerts are the incremental store's alerts open that night, its course states
  the incremental store's.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from bonewatch import pipeline
from bonewatch.config import with_overrides
from bonewatch.ingest import feeds
from bonewatch.ingest.feeds import EVENT_COLUMNS, LAB_COLUMNS
from bonewatch.store import db, writes
from bonewatch.store.tables import alerts, course_states, metadata
from tests.conftest import throwaway_pg_database
from tests.integration.test_incremental import alert_state

FIRST = date(2025, 3, 10)
NIGHTS = 5
PATIENTS = 20   # a night of 20 patients costs about what a night of one does
#: (LOINC, unit, low, high, decimals) of the results drawn
LABS = {"creatinine": ("2160-0", "mg/dL", 0.6, 2.6, 2), "alp": ("6768-6", "U/L", 60, 320, 0),
        "ggt": ("2324-2", "U/L", 15, 120, 0), "calcium": ("17861-6", "mg/dL", 7.4, 10.2, 1),
        "albumin": ("1751-7", "g/dL", 2.8, 4.6, 1), "urine_acr": ("14959-1", "mg/g", 10, 400, 0)}
STATE_COLUMNS = ["patient_id", "agent_class", "course_start", "last_dose", "course_end", "status", "hold_reason",
                 "renal_baseline_scr", "renal_baseline_date", "renal_baseline_crcl", "baseline_note"]

# a day relative to the first night: most of a history lies before it (reviews need a year)
past_day = st.integers(min_value=-760, max_value=NIGHTS - 1)
near_day = st.integers(min_value=-120, max_value=NIGHTS - 1)
lag = st.sampled_from([0, 0, 1, 2, 4])   # nights between collection and delivery


@st.composite
def patient(draw, pid: str) -> dict:
    """One patient's rows: (collected day offset, arrival offset, kind, row tuple)."""
    rows = []
    serial = iter(range(10_000))

    def arrival(day: int) -> int:
        return max(day, -1) + draw(lag)       # -1: the history load before the first night

    def event(day: int, kind: str, value: str = "", detail: str = "", at: str | None = None) -> None:
        rows.append((day, arrival(day), "event", (pid, kind, at or (FIRST + timedelta(days=day)).isoformat(),
                                                  value, detail)))

    start = draw(st.integers(min_value=-800, max_value=-100))
    diagnosis = draw(st.sampled_from([("MM", "C90.00"), ("MM", "C90.00"), ("MGUS", "D47.2"), ("SMM", "C90.00")]))
    event(start, "diagnosis", *diagnosis)
    if draw(st.integers(0, 4)):
        event(start, "birth_date", draw(st.sampled_from(["1941-05-02", "1950-01-01", "1962-11-30"])))
    if draw(st.booleans()):
        event(start, "sex", draw(st.sampled_from(["F", "M"])))
    for day in draw(st.lists(near_day, max_size=3)) + [start]:
        event(day, "weight_kg", f"{draw(st.integers(min_value=45, max_value=110))}.0")
    for day in draw(st.lists(past_day, max_size=2)):
        event(day, "dental_exam", "completed")
    for day in draw(st.lists(past_day, max_size=2)):
        event(day, "myeloma_therapy_start", draw(st.sampled_from(["bortezomib", "lenalidomide"])))
    agent = draw(st.sampled_from(["zoledronic_acid", "zoledronic_acid", "pamidronate", "denosumab"]))
    first_dose = draw(st.integers(min_value=-760, max_value=NIGHTS - 1))
    gaps = draw(st.lists(st.sampled_from([21, 28, 28, 35, 90, 200]), max_size=24))
    day = first_dose
    for gap in [0, *gaps]:
        day += gap
        if day >= NIGHTS:
            break
        other = draw(st.sampled_from([agent] * 5 + ["zoledronic_acid", "pamidronate"]))
        mg = {"zoledronic_acid": draw(st.sampled_from(["4.0", "3.5", "3.0"])), "pamidronate": "90",
              "denosumab": "120"}[other]
        event(day, "bisphosphonate_dose", other, mg, f"{(FIRST + timedelta(days=day)).isoformat()}T14:00:00+00:00")
    for day in draw(st.lists(past_day, max_size=1)):
        event(day, "bisphosphonate_stop", agent)
    for day in draw(st.lists(past_day, max_size=3)):
        event(day, "albuminuria_mg_24h", str(draw(st.sampled_from([40, 120, 480, 650]))))
    for day in draw(st.lists(past_day, max_size=3)):
        event(day, "response", draw(st.sampled_from(["CR", "VGPR", "PR", "PD"])))
        event(day, "bone_disease", draw(st.sampled_from(["active", "none"])))

    draws = draw(st.lists(st.tuples(st.one_of(past_day, near_day, near_day),
                                    st.lists(st.sampled_from(sorted(LABS)), min_size=1, max_size=3, unique=True)),
                          max_size=14))
    for day, analytes in draws:
        stamp = f"{(FIRST + timedelta(days=day)).isoformat()}T0{draw(st.integers(7, 9))}:00:00+00:00"
        when = arrival(day)
        for analyte in analytes:
            code, unit, low, high, decimals = LABS[analyte]
            value = round(draw(st.floats(min_value=low, max_value=high)), decimals)
            rid = f"{pid}-{next(serial)}"
            rows.append((day, when, "lab", (pid, rid, code, f"{value:.{decimals}f}", unit, stamp, "final")))
            fix = draw(st.sampled_from([None] * 6 + ["corrected", "cancelled"]))
            if fix is not None:
                later = draw(st.integers(min_value=min(max(when, 0), NIGHTS), max_value=NIGHTS))   # NIGHTS: never
                if fix == "corrected":
                    value = round(draw(st.floats(min_value=low, max_value=high)), decimals)
                rows.append((day, later, "lab", (pid, rid, code, f"{value:.{decimals}f}", unit, stamp, fix)))
    return rows


histories = st.tuples(*[patient(f"H{i}") for i in range(1, PATIENTS + 1)]).map(lambda parts: [r for p in parts for r in p])


def _deliveries(rows: list[tuple]) -> list[tuple[list[tuple], list[tuple]]]:
    """(lab rows, event rows) a delivery: the history (index 0), then one a night (index k + 1)."""
    return [([row for _, when, kind, row in rows if min(when, NIGHTS) == night and kind == "lab"],
             [row for _, when, kind, row in rows if min(when, NIGHTS) == night and kind == "event"])
            for night in range(-1, NIGHTS)]


def _load(engine, settings, delivery: tuple[list[tuple], list[tuple]], name: str) -> None:
    """Store one delivery as ingest does (parse, upsert, mark the patients), without its file and
    GX steps (`pipeline.ingest` is tested elsewhere; here they would take most of the time)."""
    labs, events = delivery
    received = datetime(2025, 12, 1, tzinfo=UTC)   # after every row: none is in the future
    with engine.begin() as conn:
        writes.prepare_bulk(conn)
        marks = writes.PatientMarks()
        for rows, columns, parse, write in ((labs, LAB_COLUMNS, feeds.parse_labs, writes.upsert_results),
                                            (events, EVENT_COLUMNS, feeds.parse_events, writes.insert_events)):
            if rows:
                frame = pd.DataFrame(rows, columns=columns, index=range(2, len(rows) + 2), dtype=object)
                parsed = parse(frame, settings, name, received)
                assert parsed.rejected.empty, parsed.rejected
                write(conn, parsed.rows, marks)
        marks.flush(conn)


def _empty(engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name != "alembic_version":
                conn.execute(delete(table))


def _course_states(engine) -> list[tuple]:
    with engine.connect() as conn:
        rows = conn.execute(select(*[course_states.c[c] for c in STATE_COLUMNS])).all()
    return sorted(tuple("" if v is None else str(v) for v in r) for r in rows)


def _open_findings(engine) -> list[tuple]:
    """The night's findings as stored: open alerts' patient, rule, episode and structured evidence."""
    with engine.connect() as conn:
        rows = conn.execute(select(alerts.c.patient_id, alerts.c.rule, alerts.c.episode, alerts.c.evidence)
                            .where(alerts.c.status != "resolved")).all()
    out = []
    for r in rows:
        evidence = {k: v for k, v in json.loads(r.evidence).items() if k != "summary"}
        out.append((r.patient_id, r.rule, r.episode, json.dumps(evidence, sort_keys=True)))
    return sorted(out)


@pytest.fixture
def other_urls(db_url, tmp_path):
    """Two more stores of the same kind as `db_url`: the full one and the replay one."""
    if db_url.startswith("sqlite"):
        yield [f"sqlite:///{tmp_path / name}.db" for name in ("full", "replay")]
        return
    with ExitStack() as stack:
        yield [stack.enter_context(throwaway_pg_database(f"bonewatch_{name}")) for name in ("full", "replay")]


def test_incremental_nights_equal_replays_and_full_evaluations(settings, other_urls):
    urls = {"incremental": settings.database_url, "full": other_urls[0], "replay": other_urls[1]}
    stores = {name: with_overrides(settings, database__url=url) for name, url in urls.items()}
    engines = {name: db.make_engine(s.database_url) for name, s in stores.items()}
    for engine in engines.values():
        db.upgrade(engine)
    checked = {"rows": 0, "late": 0, "fixes": 0, "alerts": 0}

    @hsettings(max_examples=2, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
    @given(rows=histories)
    def check(rows):
        deliveries = _deliveries(rows)
        for engine in engines.values():
            _empty(engine)
        for name in ("incremental", "full"):
            _load(engines[name], settings, deliveries[0], "d00")
        for k in range(NIGHTS):
            night = FIRST + timedelta(days=k)
            for name in ("incremental", "full"):
                _load(engines[name], settings, deliveries[k + 1], f"d{k + 1:02d}")
            pipeline.evaluate(stores["incremental"], night)
            pipeline.evaluate(stores["full"], night, full=True)
            assert alert_state(engines["incremental"]) == alert_state(engines["full"]), f"full differs on {night}"
            incremental_states = _course_states(engines["incremental"])
            assert incremental_states == _course_states(engines["full"]), f"full course states differ on {night}"

            _empty(engines["replay"])
            for index, delivery in enumerate(deliveries[:k + 2]):
                _load(engines["replay"], settings, delivery, f"d{index:02d}")
            pipeline.evaluate(stores["replay"], night)
            assert _open_findings(engines["replay"]) == _open_findings(engines["incremental"]), \
                f"replay differs on {night}"
            assert _course_states(engines["replay"]) == incremental_states, f"replay course states differ on {night}"
        checked["rows"] += len(rows)
        checked["late"] += sum(1 for day, when, _, _ in rows if day < when and 1 <= when < NIGHTS)
        checked["fixes"] += sum(1 for _, _, kind, row in rows if kind == "lab" and row[-1] != "final")
        checked["alerts"] += len(alert_state(engines["incremental"]))

    try:
        check()
    finally:
        for engine in engines.values():
            engine.dispose()
    # the generated histories exercised what the test is about
    assert checked["late"] >= 5 and checked["fixes"] >= 5 and checked["alerts"] >= 10, checked
