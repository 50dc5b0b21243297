"""Airflow for the DAG tests: a private AIRFLOW_HOME with a SQLite metadata database.

Airflow reads its configuration once, when `airflow` is first imported. So the environment is set
here, when pytest imports this conftest (before any module of tests/dags, and before anything
else in the suite imports airflow); the test modules import airflow lazily, inside fixtures.
Every pytest process (xdist worker) gets its own temporary home; the test modules here mark
themselves `xdist_group("airflow")`, so one worker parses, migrates and runs all of them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
DAG_IDS = ["bonewatch_ingest", "bonewatch_monitor"]

_HOME = Path(tempfile.mkdtemp(prefix="bonewatch-airflow-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
    "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(_HOME / "logs"),
}

if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(_HOME):
    # Too late: Airflow already read another configuration (and maybe ~/airflow/airflow.db).
    raise RuntimeError("airflow was imported before tests/dags/conftest.py set AIRFLOW_HOME; "
                       "import airflow lazily in the tests")
os.environ.update(AIRFLOW_ENV)


@pytest.fixture(scope="session")
def dagbag():
    """The DAGs folder parsed once, as the DAG processor parses it."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


@pytest.fixture(scope="session")
def airflow_db():
    """`airflow db migrate` once per session, on the private SQLite metadata database.

    `dag.test()` then needs nothing else on 3.3.2: it syncs the DAG bundle (the DAGs folder above)
    to the database itself before it creates the run.
    """
    env = {**os.environ, **AIRFLOW_ENV}
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return _HOME / "airflow.db"


@pytest.fixture
def fast_retries(monkeypatch):
    """Retries happen at once instead of after their back-off (minutes), so a failing task fails
    the test in seconds; the retry count itself is what the DAG declares."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk import timezone

    monkeypatch.setattr(TaskInstance, "next_retry_datetime", lambda self: timezone.utcnow())
