"""Small helpers the Airflow DAGs call: the shared Asset, the schedule's time zone, which night a
run processes, and the data-team notifications (one email per failed or late run).

Import cost matters here: the DAG processor imports this module at parse time, so the top level
only touches the standard library and `airflow.sdk.Asset`. Settings, pandas and the store are
imported inside the functions that run in tasks or callbacks.

Failure and lateness emails go to the *data team* (`[recipients] data_team`), never to the nurses:
an operational problem is not a clinical finding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import smtplib
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

#: The feeds `bonewatch_ingest` loads, one task each (`ingest_<feed>`): the canonical lab CSV, the
#: events CSV, HL7 v2 ORU files, FHIR Bundles / NDJSON from the inbox, and the SQL sources.
FEEDS = ("labs", "events", "hl7", "fhir", "sql")

#: One asset per feed: the raw longitudinal store as that feed updates it, one night's partition
#: at a time. Each asset event carries `extra={"partition": "YYYY-MM-DD"}` (the night it loaded).
#: `bonewatch_monitor` runs once every feed's task has finished the night.
FEED_ASSETS = {feed: Asset(name=f"bonewatch_raw_{feed}", uri=f"bonewatch://raw/{feed}") for feed in FEEDS}
RAW_ASSET = FEED_ASSETS["labs"]

#: The environment variable that sets the zone of the nightly cron. Read at parse time only from
#: the environment (no file or DB I/O while parsing); keep it equal to `[site] timezone`.
TIMEZONE_ENV = "BONEWATCH_TIMEZONE"

PARTITION_KEY = "partition"


def schedule_timezone(env: Mapping[str, str] | None = None) -> str:
    """The IANA zone of the nightly schedule: `$BONEWATCH_TIMEZONE`, default "UTC".

    An unknown zone raises ValueError naming the variable, so the DAG file shows an import error
    in the UI instead of silently running at the wrong hour.
    """
    env = os.environ if env is None else env
    name = env.get(TIMEZONE_ENV, "").strip() or "UTC"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{TIMEZONE_ENV}: unknown time zone {name!r}") from exc
    return name


def hospital_zone(settings) -> ZoneInfo:
    """The zone nights are counted in (`[site] timezone`), with a warning in the task log when
    the schedule runs in another zone (`BONEWATCH_TIMEZONE`): a 01:30 run could then fall on the
    wrong local day."""
    scheduled = schedule_timezone()
    if scheduled != settings.site.timezone:
        log.warning("%s is %s but [site] timezone is %s: set them to the same zone",
                    TIMEZONE_ENV, scheduled, settings.site.timezone)
    return settings.tz


def parse_night(value: Any) -> date:
    """A night from `YYYY-MM-DD` (or a date); ValueError with the bad value otherwise."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ValueError(f"partition must be YYYY-MM-DD, got {value!r}") from None


def night_before(moment: datetime, tz: ZoneInfo) -> date:
    """The night a run at `moment` processes: the day before its local date in `tz`.

    The 01:30 run on day D loads night D-1 (the deliveries of `<inbox>/<D-1>/`). Converting to the
    hospital zone first matters: 01:30 on day D in Asia/Tokyo is 16:30 UTC on day D-1.
    """
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return moment.astimezone(tz).date() - timedelta(days=1)


def ingest_night(conf: Mapping[str, Any] | None, logical_date: datetime | None,
                 run_after: datetime | None, tz: ZoneInfo) -> date:
    """The night an ingest run loads.

    `dag_run.conf["partition"]` wins (a manual re-run of one night); otherwise the night before
    the run's logical date (scheduled and backfill runs) or, for a manual run without a logical
    date, before its `run_after`.
    """
    if conf and conf.get(PARTITION_KEY):
        return parse_night(conf[PARTITION_KEY])
    moment = logical_date or run_after
    if moment is None:
        raise ValueError("the run has neither a logical date nor run_after; pass conf partition")
    return night_before(moment, tz)


def monitor_nights(events: Iterable[Any], conf: Mapping[str, Any] | None,
                   run_after: datetime | None, tz: ZoneInfo) -> list[date]:
    """The nights a monitor run evaluates, oldest first, without duplicates.

    Normally one: the partition in the extra of the triggering asset event. Several events can
    arrive in one run (a backfill of the ingest DAG queues events faster than the monitor runs), so
    every night is kept and evaluated in order. With no events (a manual trigger, or `dag.test()`,
    which delivers none) `conf["partition"]` is used, and failing that the night before `run_after`.
    """
    nights = set()
    for event in events:
        extra = getattr(event, "extra", None) or {}
        if extra.get(PARTITION_KEY):
            nights.add(parse_night(extra[PARTITION_KEY]))
    if not nights and conf and conf.get(PARTITION_KEY):
        nights.add(parse_night(conf[PARTITION_KEY]))
    if not nights:
        if run_after is None:
            raise ValueError("no triggering asset event, no conf partition and no run_after")
        nights.add(night_before(run_after, tz))
    return sorted(nights)


class DeliveriesUnreadable(AirflowFailException):
    """A night's files or sources could not be read (`failed_deliveries` names them); fails the run
    without a retry. Its message is bonewatch's own (file names, lines, what was wrong), so the data
    team's email quotes it."""


def failed_deliveries(summary: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> str | None:
    """One line naming the unreadable files (or unreachable sources) of one or several ingest
    summaries, or None when all were read."""
    summaries = [summary] if isinstance(summary, Mapping) else list(summary)
    failed = sum(int(s.get("failed_files") or 0) for s in summaries)
    if not failed:
        return None
    errors = [str(e) for s in summaries for e in (s.get("errors") or [])]
    shown = "; ".join(errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{failed} file(s) or source(s) could not be read: {shown}{more}"


def ingest_feed(feed: str, context: Mapping[str, Any]) -> dict:
    """The body of the ingest task of one feed: load the night's files of that feed (or pull the
    SQL sources), then set the feed's asset event extra to {"partition": night}.

    A file that cannot be read does not fail the task: the night still loads what it could and
    `check_deliveries` fails the run afterwards. An unreachable SQL source raises on every try but
    the last (so the task retries with back-off); on the last try the failure is reported the same
    way, so one source that is down does not keep the nurses from the other feeds' alerts."""
    from bonewatch import pipeline
    from bonewatch.config import load_settings

    settings = load_settings()
    dag_run = context["dag_run"]
    night = ingest_night(dag_run.conf, context.get("logical_date"), dag_run.run_after, hospital_zone(settings))
    if feed == "sql":
        summary = pipeline.pull(settings, partition=night.isoformat())
        ti = context.get("ti")
        last_try = ti is None or int(getattr(ti, "try_number", 1) or 1) > int(getattr(ti, "max_tries", 0) or 0)
        if summary.failed_files and not last_try:
            raise RuntimeError(failed_deliveries(summary.as_dict()))
    else:
        summary = pipeline.ingest(settings, pipeline.partition_paths(settings, night),
                                  partition=night.isoformat(), feed=feed)
    context["outlet_events"][FEED_ASSETS[feed]].extra = {PARTITION_KEY: night.isoformat()}
    return {"feed": feed, "partition": night.isoformat(), **summary.as_dict()}


# ---- data-team notifications -------------------------------------------------------------------
#
# One failed run, one email. A task's final failure is *recorded* by the task callback (an XCom
# `FAILURE_KEY` on the failed task: its exception's type, or bonewatch's own one-line message, the
# try and where its log is); the DAG callback, which Airflow calls once when the run fails, reads
# the records of every failed task and sends one email listing them. A store outage that fails the
# five feed tasks of bonewatch_ingest is one email, not five. A DAG without a run-level callback
# still hears from each failed task (`email_data_team_on_failure` mails when nobody else will).

#: The XCom key of a failed task's record (a dict, no patient data: see `_error_line`).
FAILURE_KEY = "bonewatch_failure"

#: The domain of the data team's Message-IDs (the digests use the same: `notify.outbox`).
MESSAGE_ID_DOMAIN = "bonewatch"


def data_team_message_id(*parts: Any) -> str:
    """A stable Message-ID for a data-team email about `parts` (e.g. dag_id, run_id): sent again
    for the same run (a resend, a retried callback), it carries the same id, so clients that
    de-duplicate on it show it once."""
    key = "/".join(str(part) for part in parts)
    return f"<bonewatch.ops.{hashlib.sha256(key.encode()).hexdigest()[:24]}@{MESSAGE_ID_DOMAIN}>"


def send_to_data_team(subject: str, body: str, settings=None, *, message_id: str | None = None) -> None:
    """Email the data team through the configured SMTP server (settings.smtp), with `Date:`,
    `Message-ID:` (`message_id`, else a fresh one) and `Auto-Submitted:` headers.

    Plain `smtplib`: this path must work when the rest of bonewatch is what broke.
    """
    if settings is None:
        from bonewatch.config import load_settings

        settings = load_settings()
    smtp = settings.smtp
    smtp.check_login_transport()
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(settings.recipients.data_team)
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id or make_msgid(idstring="bonewatch.ops", domain=MESSAGE_ID_DOMAIN)
    # RFC 3834: out-of-office replies and auto-responders must not answer a robot.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body)
    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
        if smtp.starttls:
            client.starttls()
        if smtp.user:
            client.login(smtp.user, smtp.password)
        client.send_message(message, to_addrs=list(settings.recipients.data_team))


def _partition_of(conf: Any) -> str:
    """The night a run's conf names, or "-": the rest of a conf is never shown (an operator may
    have put anything in it)."""
    value = conf.get(PARTITION_KEY) if isinstance(conf, Mapping) else None
    return str(value)[:10] if value else "-"


def _log_pointer(ti: Any, dag_id: str, task_id: str, run_id: str, try_number: Any) -> str:
    """Where the operator finds the failure's message and traceback: the task instance's log URL
    when Airflow can build it, and always the coordinates to find it by hand."""
    where = f"Airflow task log of {dag_id} / run {run_id} / task {task_id} / try {try_number}"
    try:
        url = str(getattr(ti, "log_url", "") or "")
    except Exception:  # noqa: BLE001 - the URL needs Airflow's configuration; the coordinates suffice
        url = ""
    return f"{where}: {url}" if url.startswith(("http://", "https://")) else where


def _error_line(error: BaseException | None) -> str:
    """The failure in the data team's email: bonewatch's own errors (`BonewatchError`,
    `DeliveriesUnreadable`: their messages name files, lines and settings, never patient data) with
    their message; any other exception by its type only."""
    from bonewatch.errors import BonewatchError

    if error is None:
        return "unknown"
    if isinstance(error, BonewatchError | DeliveriesUnreadable):
        text = " ".join(str(error).split())
        return f"{type(error).__name__}: {text if len(text) <= 500 else text[:499] + '…'}"
    return f"{type(error).__name__} (the message is in the log)"


def failure_record(context: Mapping[str, Any]) -> dict:
    """What the data team may read about one failed task, from its callback context: task (with
    `[map index]` for a mapped task), try, the error line (`_error_line`) and the log pointer."""
    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", None)
    if isinstance(map_index, int) and map_index >= 0:
        task_id = f"{task_id}[{map_index}]"
    run_id = getattr(ti, "run_id", None) or getattr(dag_run, "run_id", "?")
    try_number = getattr(ti, "try_number", "?")
    error = context.get("exception")
    return {"task": task_id, "try": str(try_number), "error": _error_line(error),
            "error_type": type(error).__name__ if error is not None else "",
            "log": _log_pointer(ti, dag_id, task_id, run_id, try_number)}


def email_data_team_on_failure(context: Mapping[str, Any]) -> None:
    """Task `on_failure_callback` (final failure, after the retries): record the failure for the
    run's email (XCom `FAILURE_KEY`), and email the data team only when the DAG has no run-level
    callback to do it (`email_data_team_on_run_failure`: one email per failed run).

    The record carries the exception's *type* and a pointer to the task log, never the message of
    an exception bonewatch did not write (`_error_line`): a database error quotes the SQL
    parameters (patient ids, values) and a library's parser error the line it read. The message
    and the traceback are in the task log.

    Runs in the task's process. Never raises: a broken mail server or API must not hide the
    original error in the task log.
    """
    record = failure_record(context)
    ti = context.get("task_instance") or context.get("ti")
    try:
        if ti is not None and hasattr(ti, "xcom_push"):
            ti.xcom_push(key=FAILURE_KEY, value=record)
    except Exception:  # noqa: BLE001 - the run's email then lists the task without its error type
        log.exception("could not record the failure of %s for the run's email", record["task"])
    dag = context.get("dag") or getattr(ti, "task", None) and getattr(ti.task, "dag", None)
    if dag is not None and getattr(dag, "on_failure_callback", None):
        return                          # the run's callback sends the one email
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", "?")
    run_id = getattr(ti, "run_id", None) or getattr(dag_run, "run_id", "?")
    lines = [
        f"The Airflow task {dag_id}.{record['task']} failed (after any retries it has).",
        "",
        f"run:      {run_id}",
        f"try:      {record['try']}",
        f"logical:  {context.get('logical_date')}",
        f"night:    {_partition_of(getattr(dag_run, 'conf', None))}",
        f"error:    {record['error']}",
        f"log:      {record['log']}",
        "",
        "Nurses were not notified of this failure. Tonight's alerts may be late or missing until "
        "the run is repaired and cleared.",
    ]
    try:
        send_to_data_team(f"[bonewatch] FAILED {dag_id}.{record['task']} ({run_id})", "\n".join(lines),
                          message_id=data_team_message_id(dag_id, run_id, record["task"]))
    except Exception:  # noqa: BLE001 - a callback must not raise (an SMTP error quotes no patient data)
        log.exception("could not email the data team about the failure of %s.%s", dag_id, record["task"])


def _task_states(dag_id: str, run_id: str) -> dict[str, str]:
    """{task id or "task_id_<map index>": state} of a run, from where the callback runs: through the
    supervisor's channel (the DAG processor, in a deployment), else, in an in-process run
    (`dag.test()`, `airflow dags test`, which run the callback beside the metadata database), from
    that database."""
    from airflow.sdk.execution_time import task_runner

    if getattr(task_runner, "SUPERVISOR_COMMS", None) is not None:
        states = task_runner.RuntimeTaskInstance.get_task_states(dag_id=dag_id, run_ids=[run_id])
        return {key: str(state) for key, state in (states.get(run_id) or {}).items()}
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state)
                               .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)).all()
    return {task if index < 0 else f"{task}_{index}": str(state) for task, index, state in rows}


def _failure_of(dag_id: str, run_id: str, task_id: str, map_index: int) -> Mapping[str, Any] | None:
    """The record the failed task's callback left (`FAILURE_KEY`), or None."""
    from airflow.sdk.execution_time import task_runner

    if getattr(task_runner, "SUPERVISOR_COMMS", None) is not None:
        from airflow.sdk.execution_time.xcom import XCom

        value = XCom.get_one(key=FAILURE_KEY, dag_id=dag_id, task_id=task_id, run_id=run_id,
                             map_index=map_index)
    else:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id,
                                                     map_indexes=map_index, key=FAILURE_KEY)).first()
            value = XComModel.deserialize_value(row) if row is not None else None
    return value if isinstance(value, Mapping) else None


def _split_key(key: str, task_ids: set[str]) -> tuple[str, int]:
    """(task id, map index) of a key of `_task_states` ("task" or "task_<map index>")."""
    if key in task_ids:
        return key, -1
    task, _, index = key.rpartition("_")
    return (task, int(index)) if index.isdigit() and task in task_ids else (key, -1)


def run_failures(dag_id: str, run_id: str, task_ids: Iterable[str]) -> list[dict]:
    """Every failed task of a run, each with its failure record (`failure_record`), or, for a task
    that left none (killed, out of memory, stopped by the run's timeout), its coordinates. Sorted by
    task. Raises what the Airflow API raises; the callback falls back to the task it was given."""
    ids = set(task_ids)
    failed = []
    for key, state in sorted(_task_states(dag_id, run_id).items()):
        if state != "failed":
            continue
        task_id, map_index = _split_key(key, ids)
        record = _failure_of(dag_id, run_id, task_id, map_index)
        shown = task_id if map_index < 0 else f"{task_id}[{map_index}]"
        failed.append(dict(record) if record else {
            "task": shown, "try": "?", "error": "not recorded (the task was killed, lost or stopped "
                                                 "by the run's timeout)", "error_type": "",
            "log": f"Airflow task log of {dag_id} / run {run_id} / task {shown}"})
    return failed


def email_data_team_on_run_failure(context: Mapping[str, Any]) -> None:
    """DAG `on_failure_callback`, called once when a run fails: one email to the data team listing
    every failed task with its error line and log pointer (`run_failures`).

    Reasons: "task_failure" (tasks failed after their retries), "timed_out" (a late run stopped by
    `dagrun_timeout`: LATE), or a deadlock. An unreadable delivery (`DeliveriesUnreadable` from
    `check_deliveries`) is one of the listed failures; the email then says the night's readable
    files were loaded. The Message-ID is stable per (dag_id, run_id). Runs in the DAG processor
    (in-process under `dag.test()`). Never raises.
    """
    reason = str(context.get("reason") or "")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(dag, "dag_id", "?")
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id") or "?"
    try:
        failures = run_failures(dag_id, run_id, getattr(dag, "task_ids", None) or [])
    except Exception:  # noqa: BLE001 - the API or the DB is what broke: fall back to what the context holds
        log.exception("could not list the failed tasks of %s / %s", dag_id, run_id)
        ti = context.get("task_instance") or context.get("ti")
        failures = [{**failure_record(context), "error": "see the task log"}] if ti is not None else []
    timeout = getattr(dag, "dagrun_timeout", None)
    late = reason == "timed_out"
    unreadable_only = bool(failures) and all(f.get("error_type") == DeliveriesUnreadable.__name__
                                             for f in failures)
    if late:
        what = f"did not finish within its timeout ({timeout}); its unfinished tasks were stopped"
    elif reason == "task_failure":
        what = f"failed: {len(failures)} task(s) failed after their retries"
    else:
        what = f"failed ({reason or 'no reason given'})"
    lines = [f"The Airflow run {dag_id} / {run_id} {what}.",
             f"started:  {getattr(dag_run, 'start_date', '?')}",
             f"night:    {_partition_of(getattr(dag_run, 'conf', None))}",
             ""]
    for failure in failures:
        lines += [f"task:     {failure.get('task', '?')} (try {failure.get('try', '?')})",
                  f"error:    {failure.get('error', '?')}",
                  f"log:      {failure.get('log', '?')}",
                  ""]
    if unreadable_only:
        lines.append("The night's readable files were loaded and the nurses' alerts evaluated without "
                     "the files above. Put a corrected file in the inbox and clear the run: files "
                     "already loaded are skipped.")
    else:
        lines.append("Nurses were not notified of this problem. Tonight's alerts may be late or missing "
                     "until the run is repaired and cleared; check the scheduler, the workers and the "
                     "task logs.")
    tasks = [str(f.get("task", "?")) for f in failures]
    named = (f"{dag_id}.{tasks[0]}" if len(tasks) == 1 else
             f"{dag_id}: {', '.join(tasks[:3])}{f' +{len(tasks) - 3} more' if len(tasks) > 3 else ''}"
             if tasks else dag_id)
    kind = "LATE" if late else "UNREADABLE DELIVERY" if unreadable_only else "FAILED"
    try:
        send_to_data_team(f"[bonewatch] {kind} {named} ({run_id})", "\n".join(lines),
                          message_id=data_team_message_id(dag_id, run_id))
    except Exception:  # noqa: BLE001 - a callback must not raise
        log.exception("could not email the data team about the run %s", run_id)


#: Every bonewatch task: owned by the data team, no retry unless it does I/O (a retry cannot fix a
#: bug; I/O tasks set their own back-off), and a final failure emails the data team.
DEFAULT_ARGS = {
    "owner": "clinical-data-team",
    "retries": 0,
    "on_failure_callback": email_data_team_on_failure,
}
