"""A real Airflow deployment for the tests: `scripts/airflow-local` (what `make airflow` runs) in a
temporary folder, with throwaway PostgreSQL databases for Airflow's metadata and the bonewatch
store, the test's SMTP server, free ports, a fixed admin password, and the scheduler's and
dag-processor's intervals shortened. `deployment(...)` starts it for a given executor and number of
(Celery) workers and stops it; `Deployment` talks to it through the public REST API (v2) and tells
which Celery worker ran which task. At the end, one night the tests trigger (`write_night`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path

import httpx
import pytest

from bonewatch.ingest import hl7
from bonewatch.notify.catcher import MailCatcher
from tests.conftest import throwaway_pg_database
from tests.integration.alerting import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "airflow-local"
PASSWORD = "deployment-test-only"  # the admin's password in the test's own passwords file

# What makes a fresh deployment slow to pick work up, shortened for the test (the defaults suit a
# hospital's nightly schedule, not a test that waits on every hand-off):
TUNING = {
    # the scheduler sleeps up to this long when a loop found nothing to do (default 1 s)
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
    # the dag-processor's first pass is at start; no re-parse of the two files during the test
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "600",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
    "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
    # one parsing process: two DAG files, two shared cores
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    # metrics loops the test never reads
    "AIRFLOW__SCHEDULER__POOL_METRICS_INTERVAL": "600",
    "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "600",
    # the tasks of a night, not the machine's core count, bound the test: 6 at once is all of them
    "AIRFLOW__CORE__PARALLELISM": "8",
}


@dataclass
class Deployment:
    """A running deployment: its base URL, folders and environment."""

    url: str
    folder: Path
    env: dict[str, str]
    _client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        """An API client holding a JWT from the simple auth manager's token endpoint."""
        if self._client is None:
            answer = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": PASSWORD},
                                timeout=30)
            answer.raise_for_status()
            self._client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30, headers={
                "Authorization": f"Bearer {answer.json()['access_token']}"})
        return self._client

    def api(self, method: str, path: str, **kwargs) -> dict:
        answer = self.client.request(method, path, **kwargs)
        if answer.status_code >= 400:
            raise AssertionError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")
        return answer.json()

    def trigger(self, dag_id: str, run_id: str, *, logical_date: str | None, conf: dict | None = None) -> dict:
        return self.api("POST", f"/dags/{dag_id}/dagRuns",
                        json={"dag_run_id": run_id, "logical_date": logical_date, "conf": conf or {}})

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "run_after", "limit": 100})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"]
                for ti in tis["task_instances"]}

    def triggered_by(self, run_id: str, dag_id: str = "bonewatch_monitor") -> list[dict]:
        """The runs of `dag_id` that the asset events of ingest run `run_id` triggered."""
        found = []
        for run in self.runs(dag_id):
            events = self.api("GET", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")
            if any(e.get("source_run_id") == run_id for e in events["asset_events"]):
                found.append(run)
        return found

    def wait(self, what: str, done: Callable[[], object], deadline_s: float = 300) -> object:
        """Poll `done` until it returns something truthy. The deadline only stops a hung deployment
        from hanging the suite; it fails with the services' last log lines."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if result := done():
                return result
            time.sleep(1)
        pytest.fail(f"deployment: {what} not reached within {deadline_s:.0f} s\n{self.log_tails()}")

    def worker_tasks(self) -> dict[str, list[tuple[str, str, str, int]]]:
        """Celery: the task instances each worker received, (dag_id, run_id, task_id, map_index)
        by worker name, read off the workers' logs ("Executing workload in Celery: ... log_path=")."""
        found = {}
        for log in sorted((self.folder / "logs").glob("worker-*.log")):
            found[log.stem] = [(dag, run, task, int(index or -1)) for dag, run, task, index in
                               _WORKLOAD.findall(log.read_text(errors="replace"))]
        return found

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.folder / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)


_WORKLOAD = re.compile(r"Executing workload in Celery: .*?log_path='dag_id=([^/]+)/run_id=([^/]+)/task_id=([^/]+)/"
                       r"(?:map_index=(\d+)/)?attempt=\d+\.log'")


def _script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=600)


@contextmanager
def deployment(folder: Path, *, smtp_port: int, executor: str = "LocalExecutor", workers: int = 2,
               config: Path | None = None, extra_env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """Start the services with `scripts/airflow-local start` in `folder`, both DAGs left paused
    (unpausing runs the latest 01:30 tick at once: the test decides when), and stop them after.

    In: a fresh folder, the port of the test's SMTP server, the executor, the number of Celery
    workers, an optional BONEWATCH_CONFIG, more environment (e.g. a Celery queue of the test's own).
    PostgreSQL down fails the test (never skips)."""
    with ExitStack() as stack:
        meta = stack.enter_context(throwaway_pg_database("bonewatch_deploy_airflow"))
        store = stack.enter_context(throwaway_pg_database("bonewatch_deploy_store"))
        (folder / "home").mkdir(parents=True, exist_ok=True)
        passwords = folder / "home" / "passwords.json"
        passwords.write_text(json.dumps({"admin": PASSWORD}), encoding="utf-8")
        port = free_port()
        # Nothing of the caller's Airflow or bonewatch settings (tests/dags sets a SQLite home).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BONEWATCH_"))}
        env.update(TUNING)
        env.update({
            "AIRFLOW_LOCAL_DIR": str(folder),
            "AIRFLOW_LOCAL_PORT": str(port),
            "AIRFLOW_LOCAL_EXECUTOR": executor,
            "AIRFLOW_LOCAL_WORKERS": str(workers),
            "AIRFLOW_LOCAL_WORKER_LOG_PORT": str(free_port()),
            "AIRFLOW_LOCAL_UNPAUSE": "0",
            "AIRFLOW_LOCAL_BIN": str(Path(sys.executable).parent),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.replace("postgresql://", "postgresql+psycopg://", 1),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "BONEWATCH_DATABASE_URL": store.replace("postgresql://", "postgresql+psycopg://", 1),
            "BONEWATCH_DATA_DIR": str(folder / "bonewatch"),
            "BONEWATCH_SMTP_HOST": "127.0.0.1",
            "BONEWATCH_SMTP_PORT": str(smtp_port),
            "BONEWATCH_SMTP_STARTTLS": "false",
        })
        if config is not None:
            env["BONEWATCH_CONFIG"] = str(config)
        env.update(extra_env or {})
        started = _script("start", env)
        try:
            if started.returncode != 0:
                pytest.fail(f"airflow-local start failed: {started.stderr[-2000:]}\n{started.stdout[-2000:]}")
            yield Deployment(url=f"http://127.0.0.1:{port}", folder=folder, env=env)
        finally:
            stopped = _script("stop", env)
            # The databases are dropped (WITH FORCE) right after; a service left over would be a bug.
            assert stopped.returncode == 0, stopped.stderr


# ---- one night with alerts for two care teams and a data-quality problem -----------------------

ONCOLOGY = "oncology-nurses@hospital.example"
HAEMATOLOGY = "haematology-nurses@hospital.example"
DATA_TEAM = "clinical-data-team@hospital.example"

CONFIG = f"""\
[recipients]
default = ["{ONCOLOGY}"]
data_team = ["{DATA_TEAM}"]

[recipients.teams]
haematology = ["{HAEMATOLOGY}"]
"""


def latest_tick(now: datetime) -> datetime:
    """The latest 01:30 UTC at or before `now`: the run that unpausing bonewatch_ingest would
    create. Triggering it ourselves first means unpausing adds no run of its own."""
    tick = datetime.combine(now.date(), clock(1, 30), tzinfo=UTC)
    return tick if tick <= now else tick - timedelta(days=1)


def write_night(inbox, night: date) -> None:
    """Two patients (one a haematology patient) whose creatinine rose 0.6 mg/dL over baseline
    after zoledronic acid (RENAL_HOLD), the rises sent as HL7; one lab row of three unusable."""
    day = timedelta(days=1)
    folder = inbox / night.isoformat()
    folder.mkdir(parents=True)
    (folder / "labs.csv").write_text(textwrap.dedent(f"""\
        patient_id,result_id,loinc,value,unit,collected_at,status
        000123,R-1,2160-0,0.9,mg/dL,{night - 40 * day}T08:00:00,final
        000456,R-3,2160-0,0.8,mg/dL,{night - 40 * day}T08:00:00,final
        000456,R-4,2160-0,not-a-number,mg/dL,{night - 39 * day}T08:00:00,final
        """), encoding="utf-8")
    events = ["patient_id,event_type,occurred_at,value,detail"]
    for patient in ("000123", "000456"):
        events += [f"{patient},birth_date,1955-06-01,1955-06-01,", f"{patient},sex,{night - 60 * day},F,",
                   f"{patient},diagnosis,{night - 60 * day},MM,C90.00", f"{patient},weight_kg,{night - 40 * day},70,",
                   f"{patient},dental_exam,{night - 55 * day},,",
                   f"{patient},bisphosphonate_dose,{night - 37 * day}T10:00:00,zoledronic_acid,4"]
    events.append(f"000456,care_team,{night - 60 * day},haematology,")
    (folder / "clinical.events.csv").write_text("\n".join(events) + "\n", encoding="utf-8")
    hl7.write_hl7(folder / "lis.hl7", [("000123", "R-2", "2160-0", "1.5", "mg/dL", f"{night}T08:00:00", "final"),
                                       ("000456", "R-5", "2160-0", "1.4", "mg/dL", f"{night}T08:00:00", "final")])


def finished(airflow: Deployment, dag_id: str, run_id: str) -> dict | None:
    run = airflow.run(dag_id, run_id)
    return run if run["state"] in ("success", "failed") else None


def monitor_done(airflow: Deployment, ingest_run_id: str) -> dict | None:
    """The monitor run the ingest run's asset events triggered, once it has finished."""
    runs = airflow.triggered_by(ingest_run_id)
    return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None


def recipients(smtp: MailCatcher) -> list[str]:
    return sorted(rcpt for _, rcpts in smtp.envelopes for rcpt in rcpts)
