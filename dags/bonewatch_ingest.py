"""
### bonewatch_ingest: load last night's deliveries into the longitudinal store

**When.** Every night at 01:30 in the hospital's time zone. The zone comes from the environment
variable `BONEWATCH_TIMEZONE` (an IANA name, default `UTC`), read when the file is parsed; parsing
does no file or database I/O, so the zone cannot come from `bonewatch.toml`. Set it to the same
zone as `[site] timezone`.

**What.** The run at 01:30 on day *D* processes night *D − 1*: the files in `<inbox>/<D-1>/` plus
any loose files in the inbox (`bonewatch.pipeline.partition_paths`), and the new rows of the SQL
sources. One task a feed, side by side: `ingest_labs` (lab CSV), `ingest_events` (events CSV),
`ingest_hl7` (HL7 v2 ORU^R01), `ingest_fhir` (FHIR R4 Bundle / bulk NDJSON) and `ingest_sql` (each
`[sources.*]` table above its high-water mark). Files already in the delivery ledger are skipped,
so a retry, a clear or a rerun changes nothing; a SQL pull reads only rows above its mark. A manual
run can name another night with the conf `{"partition": "YYYY-MM-DD"}`.

**Hand-off.** Each `ingest_<feed>` task updates its asset `bonewatch://raw/<feed>` with the extra
`{"partition": "<night>"}` (a feed with nothing that night updates it too: "nothing came" is the
data-quality check's business, not a reason to hold the nurses' alerts); `bonewatch_monitor` is
scheduled on all five and evaluates the night once every feed is in. A file that cannot be read
does not block the night: the asset is still updated from what could be read, then
`check_deliveries` fails the run with the file and the first bad line, and the data team gets the
email. An unreachable SQL source retries with back-off and, on its last try, is reported the same
way.

**Failures and lateness** email the data team (`[recipients] data_team`), never the nurses: one
email per failed run, listing every task that failed after its retries (the store down for the
night is one email naming the five feed tasks, not five emails), and a run still unfinished after
4 hours (05:30, before the day shift reads the digests), which `dagrun_timeout` stops. An
unreadable delivery is the same one email, titled UNREADABLE DELIVERY.

**Past nights.** `catchup` is off: a paused or new DAG does not flood the store with old nights.
Re-load nights *N1*…*N2* with `airflow backfill create --dag-id bonewatch_ingest --from-date N1+1
--to-date N2+1T01:30 --max-active-runs 1` (logical dates: night *N* is the run of *N + 1* 01:30, and
a bare `--to-date` stops at its midnight; without `--max-active-runs 1` a backfill runs up to 10
nights at once, whatever `max_active_runs` below says). Evaluation is as-of the night, so a
backfill gives the same alerts as the nights themselves did.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import DAG, CronTriggerTimetable, task

from bonewatch.orchestration import (
    DEFAULT_ARGS,
    FEED_ASSETS,
    FEEDS,
    email_data_team_on_run_failure,
    schedule_timezone,
)

TIMEZONE = schedule_timezone()

# Only I/O tasks retry: a flaky share or a locked database heals, a bug does not. Airflow waits
# between retry_delay * 2^(k-1) and twice that before retry k (a per-try jitter it always adds to
# exponential backoff): 1-2, 2-4, 4-8 minutes, so a feed fails for good within 14 minutes.
# tests/dags/test_dag_integrity.py computes the delays through Airflow's own code against the
# "Retries:" line of each task's docstring.
IO_RETRIES = {
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}

with DAG(
    dag_id="bonewatch_ingest",
    description="Load last night's lab and clinical deliveries into the bonewatch store",
    doc_md=__doc__,
    schedule=CronTriggerTimetable("30 1 * * *", timezone=TIMEZONE),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    # On purpose: no automatic catch-up of missed nights (a paused DAG must not replay months at
    # once); backfills are explicit (`airflow backfill create`) and give the same alerts.
    catchup=False,
    max_active_runs=1,  # nights load in order: a correction must land after what it corrects
    default_args=DEFAULT_ARGS,
    # Lateness: a run past this is stopped and the DAG callback emails the data team. (A
    # DeadlineAlert would warn without stopping the run, but on Airflow 3.3.2 any DAG with
    # `deadline=` crashes `dag.test()` / `airflow dags test` once the run succeeds.)
    dagrun_timeout=timedelta(hours=4),
    on_failure_callback=email_data_team_on_run_failure,
    tags=["bonewatch", "ingest"],
) as dag:

    @task(**IO_RETRIES)
    def ingest(feed: str, **context) -> dict:
        """Load one feed's deliveries of the night and update that feed's asset with
        {"partition": night} (`bonewatch.orchestration.ingest_feed`).

        In: the feed, the run's logical date (or conf `partition`). Out: the IngestSummary as a dict.

        Retries: 3, after 1-2, 2-4, 4-8 min.
        """
        from bonewatch.orchestration import ingest_feed

        return ingest_feed(feed, context)

    @task(retries=0)
    def check_deliveries(summaries: list[dict]) -> None:
        """Fail the run, naming the files, when a delivery could not be read at all."""
        from bonewatch.orchestration import DeliveriesUnreadable, failed_deliveries

        if problem := failed_deliveries(summaries):
            raise DeliveriesUnreadable(problem)

    check_deliveries([
        ingest.override(task_id=f"ingest_{feed}", outlets=[FEED_ASSETS[feed]])(feed) for feed in FEEDS
    ])


if __name__ == "__main__":
    dag.test()
