"""Evaluation in patient partitions, on the SQLite file and on the real PostgreSQL: the locks'
shared and group modes; N partitions then the finishing step give the alerts and course states
of one whole evaluation (`bonewatch evaluate`), night after night, for N = 1 and N = 4 and for a
run that evaluates two nights at once; and two partitions of one night in two real processes at
the same time, neither waiting for the other, give the sequential result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import date

import pytest
from sqlalchemy import select

from bonewatch import pipeline, synth
from bonewatch.config import load_settings
from bonewatch.errors import Busy
from bonewatch.model import MAX_PARTITIONS
from bonewatch.store import locks
from bonewatch.store.tables import alerts, course_states
from tests.integration.test_incremental import forget_evaluations, nights_of

GROUPS = range(1, MAX_PARTITIONS + 1)
PATIENTS = 20


def state(engine) -> tuple[dict, list]:
    """Every alert's stored row (by id) and every course state row, as strings."""
    with engine.connect() as conn:
        alert_rows = {r.alert_id: tuple(str(v) for v in r) for r in conn.execute(select(alerts))}
        course_rows = sorted(tuple(str(v) for v in r) for r in conn.execute(select(course_states)))
    return alert_rows, course_rows


@pytest.fixture
def cohort(engine, settings, tmp_path):
    """A small synthetic cohort, every delivery loaded; returns the nights it spans."""
    feeds = tmp_path / "feeds"
    manifest = synth.generate(feeds, patients=PATIENTS, seed=11, last_night=date(2025, 6, 30), nights=14)
    pipeline.ingest(settings, [feeds / "history", feeds / "inbox"])
    return nights_of(manifest)


# ---- the locks ------------------------------------------------------------------------------------

def test_shared_holders_coexist_and_exclude_an_exclusive_one(engine):
    """Each hold has a connection (PostgreSQL) or an open file (SQLite) of its own, so holds in one
    thread exclude each other as processes do."""
    with locks.hold(engine, "evaluate", wait_s=0, holder="part 0/2", shared=True), \
            locks.hold(engine, "evaluate", wait_s=0, holder="part 1/2", shared=True):
        with pytest.raises(Busy) as raised:
            with locks.hold(engine, "evaluate", wait_s=0.3, holder="whole"):
                pass
        assert raised.value.holder in {"part 0/2", "part 1/2"}
        assert str(raised.value).startswith("evaluate is held by part ")
    with locks.hold(engine, "evaluate", wait_s=0, holder="whole"):
        with pytest.raises(Busy, match="^evaluate is held by whole; gave up after waiting 0 s"):
            with locks.hold(engine, "evaluate", wait_s=0, holder="part 0/2", shared=True):
                pass
    with locks.hold(engine, "evaluate", wait_s=0, holder="whole again"):   # all released
        pass


def test_a_group_lets_its_members_in_and_keeps_another_group_out(engine):
    def group(n: int, holder: str):
        return locks.hold_group(engine, "evaluate split in", n, wait_s=0, holder=holder, groups=GROUPS)

    with ExitStack() as four:
        four.enter_context(group(4, "split 4, part 0"))
        four.enter_context(group(4, "split 4, part 3"))
        with pytest.raises(Busy) as raised:
            with group(2, "split 2, part 0"):
                pass
        assert str(raised.value).startswith("evaluate split in 2 is held by split 4, part ")
    with group(2, "split 2, part 0"), group(2, "split 2, part 1"):     # the split of 4 is gone
        with pytest.raises(Busy, match="^evaluate split in 4 is held by split 2, part [01];"):
            with group(4, "split 4, part 0"):
                pass


def test_a_group_held_in_another_thread_keeps_this_one_out(engine):
    """The same across threads: one holds split 3 until told, the other cannot join split 5."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def member() -> None:
        with locks.hold_group(engine, "evaluate split in", 3, wait_s=0, holder="thread of split 3", groups=GROUPS):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=member)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(Busy, match="^evaluate split in 5 is held by thread of split 3;"):
            with locks.hold_group(engine, "evaluate split in", 5, wait_s=0.3, groups=GROUPS):
                pass
        with locks.hold_group(engine, "evaluate split in", 3, wait_s=0, groups=GROUPS):
            pass
    finally:
        release.set()
        thread.join(30)
    with locks.hold_group(engine, "evaluate split in", 5, wait_s=0, groups=GROUPS):
        pass


# ---- the same alerts ----------------------------------------------------------------------------

def test_partitions_then_finishing_give_the_alerts_of_one_evaluation(engine, settings, cohort):
    nights = [cohort[0], cohort[6], cohort[-1]]     # incremental in between

    # the reference: one whole evaluation a night, as `bonewatch evaluate` runs it
    expected = []
    for night in nights:
        pipeline.evaluate(settings, night)
        expected.append(state(engine))
    assert expected[-1][0] and expected[-1][1], "the cohort raises alerts and has courses"

    for parts in (1, 4):
        forget_evaluations(engine)
        for night, want in zip(nights, expected, strict=True):
            evaluated = [pipeline.evaluate(settings, night, partition=(i, parts)) for i in reversed(range(parts))]
            finished = pipeline.finish_evaluation(settings, night)
            assert finished.patients == 0, "every patient was in a partition"
            assert state(engine) == want, f"{parts} partition(s) differ on {night}"
        assert [s.partition for s in evaluated] == [f"{i}/{parts}" for i in reversed(range(parts))]

    # a run evaluating two nights at once (as the DAG does after a backfill): each partition
    # evaluates both nights in order, then one finishing step for the latest
    forget_evaluations(engine)
    pipeline.evaluate(settings, nights[0])
    for i in range(4):
        for night in nights[1:]:
            pipeline.evaluate(settings, night, partition=(i, 4))
    assert pipeline.finish_evaluation(settings, nights[-1]).patients == 0
    assert state(engine) == expected[-1]


def test_a_partition_touches_only_its_own_patients(engine, settings, cohort):
    """Partition 0/2 of a later night: the other partition's alerts and course states are left
    exactly as they were; its own open alerts are all seen that night, evaluated or not (so a
    run evaluating several nights keeps each night's order without a global step between them)."""
    from bonewatch.model import partition_of

    pipeline.evaluate(settings, cohort[7])
    before_alerts, before_courses = state(engine)
    night = cohort[-1]

    summary = pipeline.evaluate(settings, night, partition=(0, 2))

    after_alerts, after_courses = state(engine)
    with engine.connect() as conn:
        owner = {a: partition_of(p, 2) for a, p in conn.execute(select(alerts.c.alert_id, alerts.c.patient_id))}
        open_ = {a for a, s in conn.execute(select(alerts.c.alert_id, alerts.c.status)) if s != "resolved"}
        last_seen = dict(conn.execute(select(alerts.c.alert_id, alerts.c.last_seen_on)).all())
    assert summary.patients < PATIENTS and {owner[a] for a in before_alerts} == {0, 1}
    assert {a: r for a, r in after_alerts.items() if owner[a] == 1} == \
        {a: r for a, r in before_alerts.items() if owner[a] == 1}
    assert [r for r in after_courses if partition_of(r[0], 2) == 1] == \
        [r for r in before_courses if partition_of(r[0], 2) == 1]
    assert {a for a in open_ if owner[a] == 0 and str(last_seen[a]) != str(night)} == set()
    assert {a for a in open_ if owner[a] == 1 and str(last_seen[a]) == str(night)} == set()


def test_finishing_evaluates_the_patients_of_a_partition_that_did_not_run(engine, settings, cohort):
    night = cohort[-1]
    pipeline.evaluate(settings, night)
    expected = state(engine)
    forget_evaluations(engine)

    partial = [pipeline.evaluate(settings, night, partition=(i, 3)) for i in (0, 2)]
    finished = pipeline.finish_evaluation(settings, night)

    assert finished.patients > 0 and sum(s.patients for s in partial) + finished.patients == PATIENTS
    assert state(engine) == expected


# ---- side by side, in real processes --------------------------------------------------------------

#: `bonewatch evaluate --partition 0/2` that stops after its first batch is committed, still holding
#: its locks, until the test creates the release file
PAUSED_PARTITION = """
import sys, time
from pathlib import Path
from datetime import date
from bonewatch import faults, pipeline
from bonewatch.config import load_settings

held, release, night = Path(sys.argv[1]), Path(sys.argv[2]), date.fromisoformat(sys.argv[3])

def point(name):
    if name == "evaluate.batch" and not held.exists():
        held.touch()
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

faults.point = point
print(pipeline.evaluate(load_settings(), night, partition=(0, 2)).patients)
"""


def test_two_partitions_at_once_in_two_processes(engine, settings, cohort, tmp_path, monkeypatch):
    night = cohort[-1]
    pipeline.evaluate(settings, night)
    expected = state(engine)
    forget_evaluations(engine)

    held, release = tmp_path / "held", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_PARTITION, str(held), str(release), night.isoformat()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refused = {}
    try:
        deadline = time.monotonic() + 120
        while not held.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.exists(), first.communicate()
        # partition 0/2 is running, mid-way: partition 1/2 runs to the end in a process of its own
        # without waiting; a whole evaluation, a split into 3 and a second 0/2 are refused at once
        second = subprocess.run([sys.executable, "-m", "bonewatch.cli", "evaluate", "--as-of", night.isoformat(),
                                 "--partition", "1/2"], env={**os.environ, "BONEWATCH_LOCK_WAIT_S": "0"},
                                capture_output=True, text=True, timeout=120)
        monkeypatch.setenv("BONEWATCH_LOCK_WAIT_S", "0")
        impatient = load_settings()
        for label, partition in (("whole", None), ("split in 3", (0, 3)), ("0/2 again", (0, 2))):
            with pytest.raises(Busy) as raised:
                pipeline.evaluate(impatient, night, partition=partition)
            refused[label] = str(raised.value)
    finally:
        release.touch()
    code, out, err = first.wait(timeout=120), *first.communicate()
    assert code == 0, err

    assert second.returncode == 0 and second.stdout.startswith(f"{night} partition 1/2: "), second
    holder = "bonewatch evaluate 0/2 "
    assert refused["whole"].startswith(f"evaluate is held by {holder}"), refused
    assert refused["split in 3"].startswith(f"evaluate split in 3 is held by {holder}"), refused
    assert refused["0/2 again"].startswith(f"evaluate 0/2 is held by {holder}"), refused
    assert int(out) + int(second.stdout.split(": ")[1].split()[0]) == PATIENTS

    assert pipeline.finish_evaluation(settings, night).patients == 0
    assert state(engine) == expected
