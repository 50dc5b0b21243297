"""The DAGs folder parses cleanly and every DAG follows the house rules (STYLE section 3):
dag_id == file name, tags, owner, doc, explicit schedule, catchup off, I/O tasks retry with
back-off, pure tasks do not, and parsing stays cheap."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tests.dags.conftest import AIRFLOW_ENV, DAG_IDS, DAGS_FOLDER

pytestmark = pytest.mark.xdist_group("airflow")

# Tasks that touch files, the store or the SMTP server; everything else is pure and must not retry.
IO_TASKS = {
    "bonewatch_ingest": {"ingest_labs", "ingest_events", "ingest_hl7", "ingest_fhir", "ingest_sql"},
    "bonewatch_monitor": {"evaluate_rules", "finish_evaluation", "send_alerts", "check_feeds"},
}


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_exactly_the_expected_dags(dagbag):
    assert sorted(dagbag.dag_ids) == sorted(DAG_IDS)
    assert sorted(p.stem for p in DAGS_FOLDER.glob("*.py")) == sorted(DAG_IDS)


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_id_is_file_name(dagbag, dag_id):
    assert Path(dagbag.dags[dag_id].fileloc).stem == dag_id


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_house_rules(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags and "bonewatch" in dag.tags
    assert dag.doc_md and dag_id in dag.doc_md
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.dagrun_timeout, "a late run must notify the data team"
    assert dag.on_failure_callback, "a timed-out run must notify the data team"
    for task in dag.tasks:
        assert task.owner and task.owner != "airflow", task.task_id
        assert task.on_failure_callback, f"{task.task_id}: failures must email the data team"


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_io_tasks_retry_with_backoff_and_pure_tasks_do_not(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert IO_TASKS[dag_id] <= set(dag.task_ids)
    for task in dag.tasks:
        if task.task_id in IO_TASKS[dag_id]:
            assert task.retries >= 2, task.task_id
            assert task.retry_exponential_backoff > 1, task.task_id
            assert timedelta(0) < task.retry_delay <= task.max_retry_delay, task.task_id
        else:
            assert task.retries == 0, f"{task.task_id} is pure: a retry cannot fix a bug"


def test_asset_handoff_one_task_and_one_asset_per_feed(dagbag):
    from bonewatch.orchestration import FEED_ASSETS

    ingest = dagbag.dags["bonewatch_ingest"]
    monitor = dagbag.dags["bonewatch_monitor"]
    for feed, asset in FEED_ASSETS.items():
        task = ingest.get_task(f"ingest_{feed}")
        assert task.outlets == [asset]
        assert task.downstream_task_ids == {"check_deliveries"}
    assert {a.uri for a in FEED_ASSETS.values()} == {
        "bonewatch://raw/labs", "bonewatch://raw/events", "bonewatch://raw/hl7", "bonewatch://raw/fhir",
        "bonewatch://raw/sql"}
    assert type(monitor.timetable).__name__ == "AssetTriggeredTimetable"
    condition = monitor.timetable.asset_condition
    assert type(condition).__name__ == "AssetAll", "the monitor waits for every feed, then runs once"
    assert list(condition.objects) == list(FEED_ASSETS.values())
    # one sending task: after the data-quality check (its email goes in the same flush), and
    # run whenever evaluation succeeded, even if the check failed; with the trigger rule's "one
    # success" taken from exactly these two (an upstream resolve_nights would let it send after
    # a failed evaluation)
    send = monitor.get_task("send_alerts")
    assert set(send.upstream_task_ids) == {"finish_evaluation", "check_feeds"}
    assert send.trigger_rule == "all_done_min_one_success"
    assert set(monitor.get_task("check_feeds").downstream_task_ids) == {"send_alerts"}
    assert set(monitor.get_task("check_feeds").upstream_task_ids) == {"resolve_nights", "finish_evaluation"}
    # evaluation: one mapped task a partition, then one finishing step after all of them
    evaluate = monitor.get_task("evaluate_rules")
    assert "MappedOperator" in {c.__name__ for c in type(evaluate).__mro__}
    assert list(evaluate.op_kwargs_expand_input.value) == ["partition"]   # mapped over the partitions
    assert set(evaluate.upstream_task_ids) == {"resolve_nights", "plan_partitions"}
    finish = monitor.get_task("finish_evaluation")
    assert set(finish.upstream_task_ids) == {"resolve_nights", "evaluate_rules"}
    assert finish.trigger_rule == "all_success"
    assert set(monitor.get_task("resolve_nights").downstream_task_ids) >= {"evaluate_rules", "finish_evaluation"}
    assert not [t.task_id for t in monitor.tasks if t.task_id != "send_alerts" and "send" in t.task_id]


def test_ingest_runs_nightly_in_the_hospital_zone(dagbag):
    timetable = dagbag.dags["bonewatch_ingest"].timetable
    assert timetable.expression == "30 1 * * *"
    assert str(timetable.timezone) == "UTC"  # the default, with BONEWATCH_TIMEZONE unset


def test_schedule_zone_comes_from_the_environment(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("BONEWATCH_TIMEZONE", "Europe/Berlin")
    bag = DagBag(dag_folder=str(DAGS_FOLDER / "bonewatch_ingest.py"))
    assert bag.import_errors == {}
    assert str(bag.dags["bonewatch_ingest"].timetable.timezone) == "Europe/Berlin"

    monkeypatch.setenv("BONEWATCH_TIMEZONE", "Mars/Olympus_Mons")
    bag = DagBag(dag_folder=str(DAGS_FOLDER / "bonewatch_ingest.py"))
    (error,) = bag.import_errors.values()
    assert "BONEWATCH_TIMEZONE" in error and "Mars/Olympus_Mons" in error


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dags_serialize(dagbag, dag_id):
    """What the DAG processor stores: deadline callbacks and the asset must serialize."""
    from airflow.serialization.serialized_objects import DagSerialization

    data = DagSerialization.serialize_dag(dagbag.dags[dag_id])
    round_trip = DagSerialization.deserialize_dag(data)
    assert set(round_trip.task_ids) == set(dagbag.dags[dag_id].task_ids)


def test_parsing_is_cheap():
    """Parse time imports neither pandas, GX, yagmail, matplotlib nor the pipeline (STYLE 3)."""
    heavy = ["pandas", "great_expectations", "yagmail", "matplotlib", "bonewatch.pipeline",
             "bonewatch.store", "bonewatch.ingest"]
    code = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    env = {**os.environ, **AIRFLOW_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _doc(task) -> str | None:
    """A task's docstring: `doc_md` (TaskFlow copies it there), or, for a mapped task, which
    keeps none, its function's."""
    if getattr(task, "doc_md", None):
        return task.doc_md
    function = getattr(task, "python_callable", None)
    return getattr(function, "__doc__", None)


def _promised_gaps(doc: str) -> tuple[int, list[tuple[float, float]]]:
    """("Retries: 3, after 1-2, 2-4, 4-8 min." in a task's docstring) -> (3, [(1, 2), (2, 4), (4, 8)])."""
    import re

    found = re.search(r"Retries: (\d+), after ([\d.\-, ]+) min\.", doc or "")
    assert found, "a retrying task states its retry delays in its docstring"
    gaps = [tuple(float(x) for x in part.strip().split("-")) for part in found.group(2).split(",")]
    return int(found.group(1)), gaps


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_retry_delays_are_the_ones_the_tasks_state(dagbag, dag_id):
    """Airflow's own code (the scheduler's `TaskInstance.next_retry_datetime`, on the task as the
    scheduler deserializes it) gives, for retry k, delays within the range each task's docstring
    states, and reaches both ends of it. (Airflow 3.3.2 waits between retry_delay * m^(k-1) and
    twice that: the first retry is not multiplied, and the jitter can double every delay.)"""
    from datetime import UTC, datetime

    from airflow.models.taskinstance import TaskInstance
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dagbag.dags[dag_id]))
    end = datetime(2025, 3, 11, 1, 30, tzinfo=UTC)
    checked = 0
    for task in dag.tasks:
        if not task.retries:
            continue
        retries, gaps = _promised_gaps(_doc(dagbag.dags[dag_id].get_task(task.task_id)))
        assert retries == task.retries and len(gaps) == retries, task.task_id
        ti = TaskInstance(task=task, run_id="r", dag_version_id=None)
        ti.end_date = end
        for k, (low, high) in enumerate(gaps, start=1):
            ti.try_number = k     # the try that just failed: retry k follows try k
            delays = []
            for day in [None, *range(300)]:   # the jitter is a hash of the logical date and the try
                ti.logical_date = None if day is None else end + timedelta(days=day)
                delays.append((ti.next_retry_datetime() - end).total_seconds() / 60)
            assert low <= min(delays) < low * 1.05, (task.task_id, k, min(delays))
            assert high * 0.95 < max(delays) <= high, (task.task_id, k, max(delays))
        checked += 1
    assert checked == len(IO_TASKS[dag_id])
