"""The deployment `make airflow` starts, tested for real: api-server, scheduler, dag-processor and
triggerer as subprocesses (LocalExecutor) on throwaway PostgreSQL databases, started once for the
module; the SMTP server runs in this process.

One night with alerts for two care teams and a data-quality problem (a third of the lab rows
unusable) is triggered through the REST API; the asset events trigger the monitor; every
recipient gets exactly one email, the data team once; the same night triggered again sends
nothing. Written against the runs' final states and the mail, not the monitor's task ids.
"""

from __future__ import annotations

import textwrap
from datetime import UTC, date, datetime, time, timedelta

import pytest

from bonewatch.ingest import hl7
from bonewatch.notify.catcher import MailCatcher
from tests.deploy.harness import Deployment, deployment

# Its own xdist group: no Airflow is imported in this process, so it need not share the DAG tests' worker.
pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("deployment")]

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
    tick = datetime.combine(now.date(), time(1, 30), tzinfo=UTC)
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


@pytest.fixture(scope="module")
def smtp():
    with MailCatcher() as catcher:
        yield catcher


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, smtp):
    folder = tmp_path_factory.mktemp("airflow-local")
    config = folder / "bonewatch.toml"
    config.write_text(CONFIG, encoding="utf-8")
    with deployment(folder, smtp_port=smtp.port, config=config) as running:
        yield running


def finished(airflow: Deployment, dag_id: str, run_id: str) -> dict | None:
    run = airflow.run(dag_id, run_id)
    return run if run["state"] in ("success", "failed") else None


def monitor_done(airflow: Deployment, ingest_run_id: str) -> dict | None:
    """The monitor run the ingest run's asset events triggered, once it has finished."""
    runs = airflow.triggered_by(ingest_run_id)
    return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None


def recipients(smtp: MailCatcher) -> list[str]:
    return sorted(rcpt for _, rcpts in smtp.envelopes for rcpt in rcpts)


def test_a_night_through_the_real_services_mails_each_recipient_once(airflow, smtp):
    # bonewatch is a package on sys.path, not an Airflow plugin (plugins/.airflowignore): the plugin
    # manager imports none of its files, so none shadows a library (ingest/hl7.py hid python-hl7)
    assert airflow.api("GET", "/plugins/importErrors")["total_entries"] == 0
    assert airflow.api("GET", "/plugins")["total_entries"] == 0
    now = datetime.now(UTC)
    tick = latest_tick(now)
    night = tick.date() - timedelta(days=1)   # the 01:30 run of day D loads night D-1
    write_night(airflow.folder / "bonewatch" / "inbox", night)

    # Through the REST API, as an operator's script would: trigger, then unpause (DAGs start paused).
    airflow.trigger("bonewatch_ingest", "deploy-night", logical_date=tick.isoformat())
    airflow.unpause("bonewatch_monitor")
    airflow.unpause("bonewatch_ingest")

    ingest = airflow.wait("the ingest run", lambda: finished(airflow, "bonewatch_ingest", "deploy-night"))
    assert ingest["state"] == "success", airflow.task_states("bonewatch_ingest", "deploy-night")
    monitor = airflow.wait("the monitor run triggered by its assets", lambda: monitor_done(airflow, "deploy-night"))
    assert monitor["run_type"] == "asset_triggered"
    assert monitor["state"] == "success", airflow.task_states("bonewatch_monitor", monitor["dag_run_id"])
    # unpausing after the trigger added no run of the same tick
    assert [r["dag_run_id"] for r in airflow.runs("bonewatch_ingest")] == ["deploy-night"]

    # exactly one email per recipient, each its own message
    assert recipients(smtp) == sorted([DATA_TEAM, HAEMATOLOGY, ONCOLOGY])
    message_ids = [m["Message-ID"] for m in smtp.messages]
    assert len(set(message_ids)) == len(message_ids) == 3
    by_rcpt = {rcpts[0]: message for message, (_, rcpts) in zip(smtp.messages, smtp.envelopes, strict=True)}
    for nurses in (ONCOLOGY, HAEMATOLOGY):
        assert "RENAL_HOLD" in by_rcpt[nurses].get_body(("plain",)).get_content()
    data_team = by_rcpt[DATA_TEAM]
    assert f"night {night}" in data_team["Subject"] and "labs bad rows" in data_team["Subject"]
    assert "000456" not in data_team.as_string()            # no patient identifiers for the data team

    # --- the same night again (no logical date: the conf names the night): nothing new is sent ---
    airflow.trigger("bonewatch_ingest", "deploy-night-again", logical_date=None,
                    conf={"partition": night.isoformat()})
    again = airflow.wait("the second ingest run",
                         lambda: finished(airflow, "bonewatch_ingest", "deploy-night-again"))
    assert again["state"] == "success", airflow.task_states("bonewatch_ingest", "deploy-night-again")
    second = airflow.wait("the second monitor run", lambda: monitor_done(airflow, "deploy-night-again"))
    assert second["state"] == "success", airflow.task_states("bonewatch_monitor", second["dag_run_id"])
    assert second["dag_run_id"] != monitor["dag_run_id"]
    assert len(smtp.messages) == 3, [m["Subject"] for m in smtp.messages[3:]]
