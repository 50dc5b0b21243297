"""The DAGs run for real: `dag.test()` in this process, SQLite for Airflow and for the store, SMTP
pointed at the aiosmtpd `mailbox`. One patient whose creatinine rose 0.6 mg/dL over the renal
baseline after a zoledronic acid dose must reach the nurses as a RENAL_HOLD email.

Also here: the helpers the DAGs rely on (which night a run processes, the data-team email), tested
without Airflow running.
"""

from __future__ import annotations

import textwrap
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from bonewatch import orchestration
from bonewatch.config import load_settings
from bonewatch.ingest import hl7

pytestmark = [
    pytest.mark.xdist_group("airflow"),
    # dag.test() runs the execution API in-process through starlette's TestClient.
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]

NURSES = "oncology-nurses@hospital.example"
DATA_TEAM = "clinical-data-team@hospital.example"

# The 01:30 run of 11 March processes the night of 10 March.
LOGICAL_DATE = datetime(2025, 3, 11, 1, 30, tzinfo=UTC)
NIGHT = "2025-03-10"

LABS = """\
patient_id,result_id,loinc,value,unit,collected_at,status
000123,R-1,2160-0,0.9,mg/dL,2025-01-28T08:00:00,final
"""
# The rise comes from the LIS as HL7 v2: the alert needs the HL7 task to have run.
RISE_HL7 = [("000123", "R-2", "2160-0", "1.5", "mg/dL", "2025-03-10T08:00:00", "final")]

EVENTS = """\
patient_id,event_type,occurred_at,value,detail
000123,birth_date,1955-06-01,1955-06-01,
000123,sex,2025-01-10,F,
000123,diagnosis,2025-01-10,MM,C90.00
000123,weight_kg,2025-01-28,70,
000123,dental_exam,2025-01-15,,
000123,bisphosphonate_dose,2025-02-01T10:00:00,zoledronic_acid,4
"""


def _load_dag(dag_id: str):
    """A fresh parse of one DAG file (DagBag parses each file under a module name of its own)."""
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.conftest import DAGS_FOLDER

    bag = DagBag(dag_folder=str(DAGS_FOLDER / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _ti_states(dag_run) -> dict[str, str]:
    """Task id -> state; a mapped task's instances as "<task_id>[<map index>]"."""
    return {ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): str(ti.state)
            for ti in dag_run.get_task_instances()}


def _xcom(dag_run, task_id: str, map_index: int | None = None):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id,
                                                 task_ids=task_id, map_indexes=map_index,
                                                 key="return_value")).one()
        return XComModel.deserialize_value(row)


def _asset_event_extras(dag_run) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetModel.uri)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetEvent.source_run_id == dag_run.run_id,
                   AssetEvent.source_dag_id == dag_run.dag_id)).all()
    return [{"uri": uri, **extra} for extra, uri in rows]


def _text(message) -> str:
    """Subject and every text part of a message."""
    parts = [str(message["Subject"])]
    for part in message.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A migrated SQLite store and an inbox holding one night's deliveries."""
    from bonewatch.store import db

    monkeypatch.setenv("BONEWATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    settings = load_settings()
    engine = db.make_engine(settings.database_url)
    db.upgrade(engine)
    engine.dispose()
    night_folder = settings.inbox / NIGHT
    night_folder.mkdir(parents=True)
    (night_folder / "labs.csv").write_text(textwrap.dedent(LABS), encoding="utf-8")
    (night_folder / "clinical.events.csv").write_text(textwrap.dedent(EVENTS), encoding="utf-8")
    hl7.write_hl7(night_folder / "lis.hl7", RISE_HL7)
    return settings


def test_ingest_then_monitor_sends_renal_hold(airflow_db, store, mailbox, fast_retries):
    # --- bonewatch_ingest, as the scheduler would run it at 01:30 on 11 March -------------------
    ingest_run = _load_dag("bonewatch_ingest").test(logical_date=LOGICAL_DATE)
    feeds = orchestration.FEEDS
    assert _ti_states(ingest_run) == {**{f"ingest_{feed}": "success" for feed in feeds},
                                      "check_deliveries": "success"}
    assert ingest_run.state == "success"
    labs, events = _xcom(ingest_run, "ingest_labs"), _xcom(ingest_run, "ingest_events")
    assert labs["partition"] == events["partition"] == NIGHT
    assert (labs["files"], events["files"], labs["failed_files"]) == (1, 1, 0)
    assert labs["accepted"] + events["accepted"] == 7 and labs["quarantined"] == 0
    assert (_xcom(ingest_run, "ingest_hl7")["files"], _xcom(ingest_run, "ingest_hl7")["accepted"]) == (1, 1)
    assert _xcom(ingest_run, "ingest_fhir")["files"] == 0     # no FHIR tonight: the asset still moves on
    extras = _asset_event_extras(ingest_run)
    assert sorted(extras, key=lambda e: e["uri"]) == sorted(
        ({"uri": orchestration.FEED_ASSETS[feed].uri, "partition": NIGHT} for feed in feeds),
        key=lambda e: e["uri"])
    event = extras[0]
    assert mailbox.messages == []

    # --- bonewatch_monitor: dag.test() delivers no asset event, so the partition goes in conf ---
    monitor_run = _load_dag("bonewatch_monitor").test(logical_date=None,
                                                      run_conf={"partition": event["partition"]})
    assert _ti_states(monitor_run) == {"resolve_nights": "success", "plan_partitions": "success",
                                       "evaluate_rules[0]": "success", "finish_evaluation": "success",
                                       "send_alerts": "success", "check_feeds": "success"}
    assert monitor_run.state == "success"
    assert _xcom(monitor_run, "resolve_nights") == [NIGHT]
    assert _xcom(monitor_run, "plan_partitions") == ["0/1"]       # [airflow] evaluate_partitions = 1
    (evaluated,) = _xcom(monitor_run, "evaluate_rules", map_index=0)
    assert evaluated["as_of"] == NIGHT and evaluated["by_rule"].get("RENAL_HOLD") == 1
    assert _xcom(monitor_run, "finish_evaluation")["patients"] == 0     # nothing left to finish
    assert _xcom(monitor_run, "send_alerts")["sent"] >= 1
    (checked,) = _xcom(monitor_run, "check_feeds")
    assert checked["night"] == NIGHT and set(checked["feeds"]) >= {"labs"}

    recipients = [rcpt for _, rcpts in mailbox.envelopes for rcpt in rcpts]
    assert DATA_TEAM not in recipients, "nothing failed: the data team gets no email"
    to_nurses = [m for m, (_, rcpts) in zip(mailbox.messages, mailbox.envelopes, strict=True)
                 if NURSES in rcpts]
    assert len(to_nurses) == 1
    assert "RENAL_HOLD" in _text(to_nurses[0])


def test_monitor_evaluates_in_mapped_partitions_then_sends_once(airflow_db, store, mailbox, fast_retries,
                                                                 monkeypatch):
    """`[airflow] evaluate_partitions = 4`: four mapped evaluate_rules instances, the patient in
    exactly the one its id hashes to, one finishing step, one digest."""
    from bonewatch import pipeline
    from bonewatch.model import partition_of

    monkeypatch.setenv("BONEWATCH_EVALUATE_PARTITIONS", "4")
    pipeline.ingest(store, pipeline.partition_paths(store, date.fromisoformat(NIGHT)), partition=NIGHT)

    run = _load_dag("bonewatch_monitor").test(logical_date=None, run_conf={"partition": NIGHT})

    assert _ti_states(run) == {"resolve_nights": "success", "plan_partitions": "success",
                               **{f"evaluate_rules[{i}]": "success" for i in range(4)},
                               "finish_evaluation": "success", "check_feeds": "success", "send_alerts": "success"}
    assert _xcom(run, "plan_partitions") == ["0/4", "1/4", "2/4", "3/4"]
    nights = [_xcom(run, "evaluate_rules", map_index=i) for i in range(4)]
    assert [[s["partition"] for s in per_night] for per_night in nights] == [["0/4"], ["1/4"], ["2/4"], ["3/4"]]
    owner = partition_of("000123", 4)
    assert [per_night[0]["patients"] for per_night in nights] == [int(i == owner) for i in range(4)]
    assert nights[owner][0]["by_rule"] == {"RENAL_HOLD": 1}
    finished = _xcom(run, "finish_evaluation")
    assert (finished["as_of"], finished["patients"], finished["partition"]) == (NIGHT, 0, "")
    to_nurses = [m for m, (_, rcpts) in zip(mailbox.messages, mailbox.envelopes, strict=True) if NURSES in rcpts]
    assert len(to_nurses) == 1 and "RENAL_HOLD" in _text(to_nurses[0])


def test_unreadable_delivery_fails_the_run_and_tells_only_the_data_team(airflow_db, store,
                                                                         mailbox, fast_retries):
    """The night still loads (the monitor gets its asset event); the run fails, naming the file."""
    night_folder = store.inbox / "2025-04-01"
    night_folder.mkdir(parents=True)
    (night_folder / "broken.csv").write_text("patient,value\n000123,1.2\n", encoding="utf-8")

    run = _load_dag("bonewatch_ingest").test(
        logical_date=datetime(2025, 4, 2, 1, 30, tzinfo=UTC))
    assert _ti_states(run) == {**{f"ingest_{feed}": "success" for feed in orchestration.FEEDS},
                               "check_deliveries": "failed"}
    assert run.state == "failed"
    assert {e["uri"]: e["partition"] for e in _asset_event_extras(run)} == {
        asset.uri: "2025-04-01" for asset in orchestration.FEED_ASSETS.values()}
    assert [rcpts for _, rcpts in mailbox.envelopes] == [[DATA_TEAM]]
    (message,) = mailbox.messages
    assert " ".join(message["Subject"].split()).startswith(
        "[bonewatch] UNREADABLE DELIVERY bonewatch_ingest.check_deliveries")
    text = _text(message)
    assert "DeliveriesUnreadable: 1 file(s) or source(s) could not be read" in text
    assert "broken.csv, line 1" in text and "readable files were loaded" in text
    assert message["Date"] and message["Message-ID"] == orchestration.data_team_message_id(
        "bonewatch_ingest", run.run_id)


def test_store_outage_fails_every_feed_task_and_sends_one_email(airflow_db, store, mailbox,
                                                                fast_retries, monkeypatch):
    """Five feed tasks fail on the same outage: the data team gets one email for the run, naming
    each task with its error (bonewatch's own line, never the database driver's message) and its log."""
    monkeypatch.setenv("BONEWATCH_DATABASE_URL",
                       "postgresql+psycopg://bonewatch:ZZSECRET@127.0.0.1:1/store?connect_timeout=2")
    run = _load_dag("bonewatch_ingest").test(logical_date=LOGICAL_DATE)
    states = _ti_states(run)
    assert {states[f"ingest_{feed}"] for feed in orchestration.FEEDS} == {"failed"}
    assert run.state == "failed"
    assert [rcpts for _, rcpts in mailbox.envelopes] == [[DATA_TEAM]]   # one email, not five
    (message,) = mailbox.messages
    assert " ".join(message["Subject"].split()).startswith("[bonewatch] FAILED bonewatch_ingest: ")
    text = _text(message)
    assert "5 task(s) failed" in text
    for feed in orchestration.FEEDS:
        assert f"task:     ingest_{feed} (try 4)" in text        # after its 3 retries
        assert f"task ingest_{feed} / try 4" in text             # where its log is
    assert text.count("error:    StoreError: cannot open the store (OperationalError)") == 5
    assert "ZZSECRET" not in text and "127.0.0.1:1" not in text
    assert message["Message-ID"] == orchestration.data_team_message_id("bonewatch_ingest", run.run_id)


# ---- the helpers the DAGs call ------------------------------------------------------------------

def test_schedule_timezone_defaults_to_utc_and_rejects_unknown_zones():
    assert orchestration.schedule_timezone({}) == "UTC"
    assert orchestration.schedule_timezone({"BONEWATCH_TIMEZONE": "Europe/Berlin"}) == \
        "Europe/Berlin"
    with pytest.raises(ValueError, match="BONEWATCH_TIMEZONE"):
        orchestration.schedule_timezone({"BONEWATCH_TIMEZONE": "Europe/Atlantis"})


def test_ingest_night_is_the_day_before_in_the_hospital_zone():
    berlin = ZoneInfo("Europe/Berlin")
    # 01:30 in Berlin on 11 March is 00:30 UTC: still 11 March locally, so the night is the 10th.
    run = datetime(2025, 3, 11, 0, 30, tzinfo=UTC)
    assert orchestration.ingest_night({}, run, None, berlin) == date(2025, 3, 10)
    # 23:30 UTC on the 10th is already the 11th in Berlin (night of the 10th), not in UTC.
    late = datetime(2025, 3, 10, 23, 30, tzinfo=UTC)
    assert orchestration.ingest_night(None, late, None, berlin) == date(2025, 3, 10)
    assert orchestration.ingest_night(None, late, None, ZoneInfo("UTC")) == date(2025, 3, 9)
    # 01:30 on the 11th in Tokyo is 16:30 UTC on the 10th.
    tokyo_run = datetime(2025, 3, 10, 16, 30, tzinfo=UTC)
    assert orchestration.ingest_night(None, tokyo_run, None, ZoneInfo("Asia/Tokyo")) == \
        date(2025, 3, 10)
    # A manual run without a logical date uses run_after; conf wins over both.
    assert orchestration.ingest_night({}, None, run, ZoneInfo("UTC")) == date(2025, 3, 10)
    assert orchestration.ingest_night({"partition": "2024-12-31"}, run, run, berlin) == \
        date(2024, 12, 31)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        orchestration.ingest_night({"partition": "31/12/2024"}, run, run, berlin)


def test_monitor_nights_from_events_then_conf_then_run_after():
    utc = ZoneInfo("UTC")
    run_after = datetime(2025, 3, 11, 2, 0, tzinfo=UTC)
    events = [SimpleNamespace(extra={"partition": "2025-03-10"}),
              SimpleNamespace(extra={"partition": "2025-03-08"}),
              SimpleNamespace(extra={"partition": "2025-03-10"}),
              SimpleNamespace(extra={})]
    assert orchestration.monitor_nights(events, {"partition": "2020-01-01"}, run_after, utc) == \
        [date(2025, 3, 8), date(2025, 3, 10)]
    assert orchestration.monitor_nights([], {"partition": "2025-01-05"}, run_after, utc) == \
        [date(2025, 1, 5)]
    assert orchestration.monitor_nights([], {}, run_after, utc) == [date(2025, 3, 10)]


def test_failed_deliveries_names_the_files():
    assert orchestration.failed_deliveries({"failed_files": 0, "errors": []}) is None
    line = orchestration.failed_deliveries(
        {"failed_files": 1, "errors": ["cannot read bad.csv, line 3: unterminated quote"]})
    assert "bad.csv, line 3" in line


PHI_ERROR = ValueError("(psycopg.errors.UniqueViolation) duplicate key: Key (patient_id)=(ZZPHINAME 99887766) "
                      "[parameters: {'patient_id': 'MRN 99887766', 'value': '1950-02-30'}]")


def _failure_context(error: BaseException, *, dag=None, pushed: list | None = None) -> dict:
    """A task callback's context, as the task runner builds it (the parts the callback reads)."""
    ti = SimpleNamespace(dag_id="bonewatch_monitor", task_id="send_alerts", run_id="asset_triggered__x",
                         try_number=4, map_index=-1,
                         log_url="http://airflow.local/dags/bonewatch_monitor/runs/x/tasks/send_alerts")
    if pushed is not None:
        ti.xcom_push = lambda key, value: pushed.append((key, value))
    return {"task_instance": ti, "dag": dag, "logical_date": None, "exception": error,
            "dag_run": SimpleNamespace(run_id="asset_triggered__x",
                                       conf={"partition": "2025-03-10", "note": "ZZPHINAME"})}


def test_task_callback_records_the_failure_and_leaves_the_email_to_the_run(mailbox):
    """In a DAG with a run-level callback, a failed task sends nothing itself: it records its
    failure (type, try, log; never a foreign exception's message) for the run's one email."""
    pushed: list = []
    dag = SimpleNamespace(dag_id="bonewatch_monitor",
                          on_failure_callback=orchestration.email_data_team_on_run_failure)
    orchestration.email_data_team_on_failure(_failure_context(PHI_ERROR, dag=dag, pushed=pushed))
    assert mailbox.messages == []
    ((key, record),) = pushed
    assert key == orchestration.FAILURE_KEY
    assert record["task"] == "send_alerts" and record["try"] == "4"
    assert record["error"] == "ValueError (the message is in the log)"
    assert "http://airflow.local/dags/bonewatch_monitor/runs/x/tasks/send_alerts" in record["log"]
    for phi in ("ZZPHINAME", "99887766", "1950-02-30", "duplicate key"):
        assert phi not in str(record)


def test_task_callback_emails_the_data_team_when_no_run_callback_will(mailbox):
    """The data team hears which task failed, the exception's type and where its log is, never the
    exception's message: a database error quotes its SQL parameters (patient data)."""
    dag = SimpleNamespace(dag_id="bonewatch_monitor", on_failure_callback=None)
    orchestration.email_data_team_on_failure(_failure_context(PHI_ERROR, dag=dag))
    assert [rcpts for _, rcpts in mailbox.envelopes] == [[DATA_TEAM]]
    (message,) = mailbox.messages
    text = _text(message)
    assert "bonewatch_monitor.send_alerts" in message["Subject"]
    assert "ValueError" in text and "try:      4" in text and "2025-03-10" in text
    assert "http://airflow.local/dags/bonewatch_monitor/runs/x/tasks/send_alerts" in text
    for phi in ("ZZPHINAME", "99887766", "1950-02-30", "duplicate key"):
        assert phi not in text and phi not in message["Subject"]
    assert message["Date"] and message["Message-ID"] == orchestration.data_team_message_id(
        "bonewatch_monitor", "asset_triggered__x", "send_alerts")
    # bonewatch's own errors name files and lines, never patient data: their message is kept
    orchestration.email_data_team_on_failure(_failure_context(orchestration.DeliveriesUnreadable(
        "1 file(s) or source(s) could not be read: cannot read bad.csv, line 3: not UTF-8 text"), dag=dag))
    assert "DeliveriesUnreadable: 1 file(s) or source(s) could not be read: cannot read bad.csv, line 3" in \
        _text(mailbox.messages[1])


@pytest.fixture
def run_records(monkeypatch):
    """The failed tasks a run-level callback finds: {run_id: {task key: (state, record)}}, in place
    of the Airflow API (the real path runs in test_store_outage_... above)."""
    runs: dict[str, dict[str, tuple[str, dict | None]]] = {}
    monkeypatch.setattr(orchestration, "_task_states",
                        lambda dag_id, run_id: {k: s for k, (s, _) in runs.get(run_id, {}).items()})

    def failure_of(dag_id, run_id, task_id, map_index):
        key = task_id if map_index < 0 else f"{task_id}_{map_index}"
        return runs[run_id][key][1]

    monkeypatch.setattr(orchestration, "_failure_of", failure_of)
    return runs


def test_run_callback_sends_one_email_per_run_with_a_stable_message_id(mailbox, run_records):
    dag = SimpleNamespace(dag_id="bonewatch_monitor", dagrun_timeout=timedelta(hours=2),
                          task_ids=["resolve_nights", "evaluate_rules", "send_alerts"])
    dag_run = SimpleNamespace(dag_id="bonewatch_monitor", run_id="r1", start_date="2025-03-11T02:00:00Z",
                              conf={"partition": "2025-03-10"})
    record = {"task": "send_alerts", "try": "4", "error": "AlertDeliveryError: 1 message(s) not accepted",
              "error_type": "AlertDeliveryError", "log": "Airflow task log of ... / try 4"}
    run_records["r1"] = {"resolve_nights": ("success", None), "evaluate_rules_0": ("failed", None),
                         "send_alerts": ("failed", record)}
    context = {"reason": "task_failure", "dag_run": dag_run, "dag": dag}
    orchestration.email_data_team_on_run_failure(context)
    orchestration.email_data_team_on_run_failure(context)      # sent again for the same run
    first, again = mailbox.messages
    assert " ".join(first["Subject"].split()) == \
        "[bonewatch] FAILED bonewatch_monitor: evaluate_rules[0], send_alerts (r1)"
    text = _text(first).replace("\r\n", "\n")
    assert "task:     send_alerts (try 4)\nerror:    AlertDeliveryError: 1 message(s) not accepted" in text
    assert "task:     evaluate_rules[0] (try ?)\nerror:    not recorded" in text
    assert "2025-03-10" in text and "Nurses were not notified" in text
    assert first["Message-ID"] == again["Message-ID"] == orchestration.data_team_message_id("bonewatch_monitor", "r1")
    assert first["Message-ID"].endswith("@bonewatch>")
    assert parsedate_to_datetime(first["Date"]).tzinfo is not None
    run_records["r2"] = run_records["r1"]
    orchestration.email_data_team_on_run_failure({**context, "dag_run": SimpleNamespace(**{**vars(dag_run),
                                                                                        "run_id": "r2"})})
    assert mailbox.messages[2]["Message-ID"] != first["Message-ID"]


def test_run_callback_emails_late_runs(mailbox, run_records):
    dag_run = SimpleNamespace(dag_id="bonewatch_ingest", run_id="scheduled__2025-03-11",
                              start_date="2025-03-11T01:30:00Z", conf={})
    dag = SimpleNamespace(dag_id="bonewatch_ingest", dagrun_timeout=timedelta(hours=4), task_ids=[])
    orchestration.email_data_team_on_run_failure({"reason": "timed_out", "dag_run": dag_run, "dag": dag})
    assert [rcpts for _, rcpts in mailbox.envelopes] == [[DATA_TEAM]]
    assert "LATE bonewatch_ingest" in mailbox.messages[0]["Subject"]
    assert "4:00:00" in _text(mailbox.messages[0])
    # The DAG processor's minimal context has no dag_run, only run_id.
    orchestration.email_data_team_on_run_failure({"reason": "timed_out", "dag": dag,
                                                  "run_id": "scheduled__2025-03-12"})
    assert "scheduled__2025-03-12" in mailbox.messages[1]["Subject"]


def test_callbacks_never_raise_when_smtp_is_down(monkeypatch):
    monkeypatch.setenv("BONEWATCH_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", "1")  # nothing listens there
    orchestration.email_data_team_on_failure({"exception": RuntimeError("boom")})
    orchestration.email_data_team_on_run_failure({"reason": "timed_out"})



def test_unreachable_sql_source_retries_then_reports_without_blocking_the_night(store, tmp_path, monkeypatch):
    """The ingest_sql task body: an unreachable source raises while Airflow has retries left (so
    it retries with back-off), and on the last try returns the failure for check_deliveries and
    still moves the feed's asset on, so the other feeds' alerts are not held back."""
    config = tmp_path / "sources.toml"
    config.write_text('[sources.lis_db]\nurl_env = "BONEWATCH_LIS_URL"\ntable = "labs"\nwatermark = "v"\n',
                      encoding="utf-8")
    monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
    monkeypatch.setenv("BONEWATCH_LIS_URL", "postgresql+psycopg://reader:s3cret@127.0.0.1:1/lab?connect_timeout=2")
    asset = orchestration.FEED_ASSETS["sql"]

    def context(try_number: int) -> dict:
        return {"dag_run": SimpleNamespace(conf={"partition": NIGHT}, run_after=None), "logical_date": None,
                "ti": SimpleNamespace(try_number=try_number, max_tries=3),
                "outlet_events": {asset: SimpleNamespace(extra=None)}}

    early = context(1)
    with pytest.raises(RuntimeError, match="lis_db") as raised:
        orchestration.ingest_feed("sql", early)
    assert "s3cret" not in str(raised.value)
    assert early["outlet_events"][asset].extra is None          # no asset event from a failed try

    last = context(4)
    summary = orchestration.ingest_feed("sql", last)
    assert (summary["feed"], summary["partition"], summary["failed_files"]) == ("sql", NIGHT, 1)
    assert last["outlet_events"][asset].extra == {"partition": NIGHT}
    assert "lis_db" in orchestration.failed_deliveries([summary]) and "s3cret" not in str(summary)
