"""The same deployment on CeleryExecutor: the local Redis as broker, two Celery workers on this
host (each serving its task logs on a port of its own), started once for the module, with the
evaluation split into 4 patient partitions. A night's tasks are spread over both workers, the 4
mapped partitions run at the same time, each task instance runs once; the alerts are those of one single-process
`bonewatch evaluate` of the same night, and the mail is the LocalExecutor run's: one email per
recipient, the data team once.
"""

from __future__ import annotations

import socket
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from tests.deploy.harness import (
    CONFIG,
    DATA_TEAM,
    HAEMATOLOGY,
    ONCOLOGY,
    deployment,
    finished,
    latest_tick,
    monitor_done,
    recipients,
    write_night,
)

# One deployment at a time on this worker: two at once would share two cores.
pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("deployment")]

REDIS = ("127.0.0.1", 6379)
PARTITIONS = 4


@pytest.fixture(scope="module")
def celery(tmp_path_factory, smtp):
    try:
        socket.create_connection(REDIS, timeout=5).close()
    except OSError as exc:
        pytest.fail(f"Redis at {REDIS[0]}:{REDIS[1]} is required by the Celery deployment test and unreachable: {exc}")
    folder = tmp_path_factory.mktemp("airflow-celery")
    config = folder / "bonewatch.toml"
    config.write_text(CONFIG, encoding="utf-8")
    # A queue of its own: no other Celery worker on this Redis takes the test's tasks, nor it theirs.
    queue = f"bonewatch-test-{uuid.uuid4().hex[:8]}"
    with deployment(folder, smtp_port=smtp.port, config=config, executor="CeleryExecutor", workers=2,
                    extra_env={"AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                               "BONEWATCH_EVALUATE_PARTITIONS": str(PARTITIONS)}) as running:
        yield running


def test_a_night_on_two_celery_workers(celery, smtp, tmp_path):
    tick = latest_tick(datetime.now(UTC))
    night = tick.date() - timedelta(days=1)
    write_night(celery.folder / "bonewatch" / "inbox", night)
    celery.trigger("bonewatch_ingest", "celery-night", logical_date=tick.isoformat())
    celery.unpause("bonewatch_monitor")
    celery.unpause("bonewatch_ingest")

    ingest = celery.wait("the ingest run", lambda: finished(celery, "bonewatch_ingest", "celery-night"))
    assert ingest["state"] == "success", celery.task_states("bonewatch_ingest", "celery-night")
    monitor = celery.wait("the monitor run", lambda: monitor_done(celery, "celery-night"))
    assert monitor["state"] == "success", celery.task_states("bonewatch_monitor", monitor["dag_run_id"])

    # the five feeds' tasks are queued at once: two workers of two slots share them
    ran = celery.worker_tasks()
    assert set(ran) == {"worker-1", "worker-2"}
    ingest_by_worker = {worker: {task for _, run, task, _ in tasks if run == "celery-night"}
                        for worker, tasks in ran.items()}
    assert all(ingest_by_worker.values()), ingest_by_worker
    # every task instance of both runs ran once, on one worker or the other
    received = Counter(t for tasks in ran.values() for t in tasks)
    expected = {("bonewatch_ingest", "celery-night", task, -1) for task in celery.task_states(
        "bonewatch_ingest", "celery-night")}
    expected |= {("bonewatch_monitor", monitor["dag_run_id"], task.split("[")[0],
                  int(task.split("[")[1].rstrip("]")) if "[" in task else -1)
                 for task in celery.task_states("bonewatch_monitor", monitor["dag_run_id"])}
    assert set(received) == expected and set(received.values()) == {1}, received

    # the evaluation's 4 mapped partitions, each once, and at the same time: queued together,
    # they run two or more at once (which worker takes them is Celery's choice: a worker whose
    # 2 slots finish first may take all 4, as a loaded CI machine showed once)
    partitions = {index: worker for worker, tasks in ran.items()
                  for _, run, task, index in tasks if task == "evaluate_rules"}
    assert sorted(partitions) == list(range(PARTITIONS)), partitions
    spans = _spans(celery, monitor["dag_run_id"], "evaluate_rules")
    assert len(spans) == PARTITIONS
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans

    # the alerts of the 4 partitions on two workers are those of one evaluation in one process
    assert _alerts(celery.env["BONEWATCH_DATABASE_URL"]) == _single_process_alerts(
        celery.folder / "bonewatch" / "inbox" / night.isoformat(), night, tmp_path)

    assert recipients(smtp) == sorted([DATA_TEAM, HAEMATOLOGY, ONCOLOGY])
    assert len({m["Message-ID"] for m in smtp.messages}) == 3


def _spans(deployment, run_id: str, task_id: str) -> list[tuple[datetime, datetime]]:
    """(start, end) of each task instance of `task_id` in the monitor run, as Airflow recorded them."""
    tis = deployment.api("GET", f"/dags/bonewatch_monitor/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    return sorted((datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
                  for ti in tis["task_instances"] if ti["task_id"] == task_id)


def _alerts(url: str) -> set[tuple]:
    from sqlalchemy import create_engine, select

    from bonewatch.store.tables import alerts

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = {(r.patient_id, r.rule, r.episode, r.severity, r.raised_on, r.evidence)
                for r in conn.execute(select(alerts))}
    engine.dispose()
    assert rows, "the night raised no alert: nothing to compare"
    return rows


def _single_process_alerts(folder, night, tmp_path) -> set[tuple]:
    """The same night's files through ingest and one unpartitioned evaluation, in this process."""
    from bonewatch import pipeline
    from bonewatch.config import load_settings

    config = tmp_path / "single.toml"
    config.write_text(CONFIG, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'single.db'}"
    settings = load_settings(config, env={"BONEWATCH_DATABASE_URL": url})
    pipeline.engine_for(settings, migrate=True)
    assert pipeline.ingest(settings, [folder], partition=night.isoformat()).failed_files == 0
    pipeline.evaluate(settings, night)
    return _alerts(url)
