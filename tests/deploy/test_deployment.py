"""The deployment `make airflow` starts, tested for real: api-server, scheduler, dag-processor and
triggerer as subprocesses (LocalExecutor) on throwaway PostgreSQL databases, started once for the
module; the SMTP server runs in this process.

One night with alerts for two care teams and a data-quality problem (a third of the lab rows
unusable) is triggered through the REST API; the asset events trigger the monitor; every
recipient gets exactly one email, the data team once; the same night triggered again sends
nothing. Written against the runs' final states and the mail, not the monitor's task ids.
"""

from __future__ import annotations

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

# Its own xdist group: no Airflow is imported in this process, so it need not share the DAG tests' worker.
pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("deployment")]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, smtp):
    folder = tmp_path_factory.mktemp("airflow-local")
    config = folder / "bonewatch.toml"
    config.write_text(CONFIG, encoding="utf-8")
    with deployment(folder, smtp_port=smtp.port, config=config) as running:
        yield running


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


def test_a_failed_run_emails_the_data_team_once(airflow, smtp):
    """An unreadable delivery fails the ingest run; the run-level callback, which a real
    deployment runs in the dag-processor (not in the task, as `dag.test()` does), emails the data
    team exactly once, with Date and Message-ID, naming the file and not its content."""
    tick = latest_tick(datetime.now(UTC)) - timedelta(days=1)
    night = tick.date() - timedelta(days=1)
    folder = airflow.folder / "bonewatch" / "inbox" / night.isoformat()
    folder.mkdir(parents=True)
    (folder / "labs.csv").write_bytes(b"patient_id,result_id\n\xff\xfe 000789 \xff\n")
    before = len(smtp.messages)

    airflow.trigger("bonewatch_ingest", "deploy-unreadable", logical_date=tick.isoformat())
    # unpaused here too: the test must not lean on the one before it having run in this deployment
    # (xdist may hand it to a worker of its own)
    airflow.unpause("bonewatch_monitor")
    airflow.unpause("bonewatch_ingest")
    run = airflow.wait("the failing ingest run", lambda: finished(airflow, "bonewatch_ingest", "deploy-unreadable"))
    assert run["state"] == "failed"
    mails = airflow.wait("the data team's email", lambda: [
        m for m in smtp.messages[before:] if "UNREADABLE DELIVERY" in str(m["Subject"])])
    airflow.wait("the monitor run of that night", lambda: monitor_done(airflow, "deploy-unreadable"))
    mails = [m for m in smtp.messages[before:] if "deploy-unreadable" in str(m["Subject"])
             or "UNREADABLE DELIVERY" in str(m["Subject"])]
    assert len(mails) == 1, [m["Subject"] for m in mails]
    (mail,) = mails
    assert mail["Date"] and mail["Message-ID"] and mail["To"] == DATA_TEAM
    body = mail.get_body(("plain",)).get_content()
    assert "labs.csv" in body and "000789" not in mail.as_string()
