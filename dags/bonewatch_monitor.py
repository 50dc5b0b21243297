"""
### bonewatch_monitor: run the clinical rules for a night and email the nurses' digests

**When.** Once `bonewatch_ingest` has updated every feed's asset (`bonewatch://raw/labs`, `/events`,
`/hl7`, `/fhir`, `/sql`), i.e. once a night after all the deliveries are loaded. Asset-triggered runs have no logical date: the night comes from
the triggering asset event's extra `{"partition": "YYYY-MM-DD"}`. If a backfill of the ingest DAG
queues several events before this DAG runs, every night is evaluated, oldest first.

**Manual runs** (and `dag.test()`, which delivers no asset event) take the night from the conf
`{"partition": "YYYY-MM-DD"}`; without it, the night before the run in the hospital's time zone.

**What.**
1. `resolve_nights`: which nights (pure; no retry).
2. `plan_partitions`: the patient partitions, `["0/N", ..., "N-1/N"]` with N from
   `[airflow] evaluate_partitions` (default 1), read when the run starts (no retry).
3. `evaluate_rules`, one mapped task a partition (dynamic task mapping), spread over the
   workers and run side by side: every rule as of each night, oldest first, for the patients of
   that partition (a stable hash of the patient id); alerts upserted on (patient, rule, episode),
   so a rerun changes nothing (`bonewatch.pipeline.evaluate(partition=...)`).
4. `finish_evaluation`, once all partitions succeeded: the night's global step (the open alerts
   of patients not evaluated are seen tonight), and any patient no partition evaluated
   (`bonewatch.pipeline.finish_evaluation`). The alerts are those of one whole evaluation.
5. `check_feeds`: record each feed's data-quality metrics for the night (arrival against its
   deadline, rows, quarantine, expectations, units) and queue an email to the data team about new
   problems (`bonewatch.pipeline.quality_check`); the dashboard reads these.
6. `send_alerts`, the only task that sends: queue the digests in the outbox and send everything
   it holds, the data team's email included (`bonewatch.pipeline.notify`). It runs once
   evaluation succeeded (every partition and the finishing step), even if `check_feeds` failed
   (the nurses' alerts never wait on a data-quality problem), and never after a failed
   evaluation. Each message is claimed before it is sent, so a retry, or a
   `bonewatch notify` at the same time, never sends one twice; an alert is marked notified only
   once the SMTP server accepted it, and an SMTP outage delays alerts without losing them.

**Failures and lateness** email the data team, never the nurses: one email per failed run,
listing every task that failed after its retries, and a run still unfinished after 2 hours,
which `dagrun_timeout` stops.

**Past nights.** `catchup` is off on purpose; it has no effect on an asset schedule anyway.
Past nights are re-evaluated by backfilling `bonewatch_ingest` (each run updates the asset) or by
triggering this DAG with a conf partition; evaluation is as-of the night, so the alerts are the
ones the night itself gave.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, task

from bonewatch.orchestration import (
    DEFAULT_ARGS,
    FEED_ASSETS,
    email_data_team_on_run_failure,
)

with DAG(
    dag_id="bonewatch_monitor",
    description="Evaluate the bonewatch rules for a night and send the alert digests",
    doc_md=__doc__,
    schedule=list(FEED_ASSETS.values()),    # all of them: one run a night, after every feed
    # On purpose: an asset schedule does not catch up; past nights go through a backfill of
    # bonewatch_ingest or a manual run with conf {"partition": ...}, and give the same alerts.
    catchup=False,
    max_active_runs=1,  # nights are evaluated in order: an episode opened on N is seen on N + 1
    default_args=DEFAULT_ARGS,
    # Lateness: a run past this is stopped and the DAG callback emails the data team. (A
    # DeadlineAlert would warn without stopping the run, but on Airflow 3.3.2 any DAG with
    # `deadline=` crashes `dag.test()` / `airflow dags test` once the run succeeds.)
    dagrun_timeout=timedelta(hours=2),
    on_failure_callback=email_data_team_on_run_failure,
    tags=["bonewatch", "monitor", "alerts"],
) as dag:

    @task(retries=0)
    def resolve_nights(**context) -> list[str]:
        """The nights to evaluate (YYYY-MM-DD, oldest first): from the triggering asset events,
        else conf `partition`, else the night before the run."""
        from bonewatch.config import load_settings
        from bonewatch.orchestration import hospital_zone, monitor_nights

        dag_run = context["dag_run"]
        triggering = context["triggering_asset_events"]
        events = [event for asset in FEED_ASSETS.values() for event in triggering.get(asset, [])]
        nights = monitor_nights(events, dag_run.conf, dag_run.run_after,
                                hospital_zone(load_settings()))
        return [night.isoformat() for night in nights]

    @task(retries=0)
    def plan_partitions() -> list[str]:
        """The patient partitions to evaluate side by side: "i/N" for i < N, N from
        `[airflow] evaluate_partitions` (read here, at run time: parsing does no I/O)."""
        from bonewatch.config import load_settings

        parts = load_settings().airflow.evaluate_partitions
        return [f"{i}/{parts}" for i in range(parts)]

    # Evaluation writes the alerts to the store (DB I/O): a lost connection or a lock timeout
    # heals on retry, and the upsert keyed on (patient, rule, episode) makes a retry harmless.
    # Mapped: one task instance a partition, each touching only its own patients. Airflow waits
    # between retry_delay * 2^(k-1) and twice that before retry k (its jitter).
    @task(retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=10))
    def evaluate_rules(nights: list[str], partition: str) -> list[dict]:
        """Run every rule as of each night for the patients of `partition` ("i/N") and store
        their alerts. Out: one summary per night.

        Retries: 2, after 1-2, 2-4 min.
        """
        from datetime import date

        from bonewatch import pipeline
        from bonewatch.config import load_settings
        from bonewatch.model import parse_partition

        settings, part = load_settings(), parse_partition(partition)
        return [pipeline.evaluate(settings, date.fromisoformat(n), partition=part).as_dict() for n in nights]

    # Store I/O, like evaluate_rules. Only the latest night: the partitions saw each earlier
    # night's unchanged alerts themselves, and finishing an earlier night after a later one was
    # evaluated would replay it for every patient.
    @task(retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=10))
    def finish_evaluation(nights: list[str]) -> dict:
        """The step after every partition, once: see the night's unchanged alerts, evaluate any
        patient left. Out: its EvaluateSummary as a dict (`as_of`: the latest night).

        Retries: 2, after 1-2, 2-4 min.
        """
        from datetime import date

        from bonewatch import pipeline
        from bonewatch.config import load_settings

        return pipeline.finish_evaluation(load_settings(), date.fromisoformat(max(nights))).as_dict()

    # SMTP I/O: an outage leaves the messages pending in the outbox; the retries (after 2.5-5, 5-10
    # and 10-20 min: Airflow waits between retry_delay * 2^(k-1) and twice that) send them, and
    # nothing the server already accepted is sent again. After check_feeds, so that its email
    # goes out in the same flush; all_done_min_one_success over exactly two upstream tasks,
    # finish_evaluation and check_feeds: evaluation must have succeeded (check_feeds cannot
    # succeed without it), check_feeds need not. (The night comes from finish_evaluation's
    # summary: an edge from resolve_nights would count as the one success.)
    @task(retries=3, retry_delay=timedelta(seconds=150), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=20), trigger_rule="all_done_min_one_success")
    def send_alerts(finished: dict) -> dict:
        """Queue the latest night's digests and send what the outbox holds (earlier nights'
        unsent alerts included). Out: the NotifySummary as a dict.

        Retries: 3, after 2.5-5, 5-10, 10-20 min.
        """
        from datetime import date

        from bonewatch import pipeline
        from bonewatch.config import load_settings

        summary = pipeline.notify(load_settings(), date.fromisoformat(finished["as_of"]))
        if summary.failed:
            from bonewatch.errors import AlertDeliveryError

            # Raise so Airflow retries with backoff; the outbox keeps what was not accepted.
            raise AlertDeliveryError(f"{summary.failed} message(s) not accepted: "
                                     + "; ".join(summary.errors[:3]))
        return summary.as_dict()

    # Store I/O; recording is keyed on (night, feed) and each problem is queued once.
    @task(retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=20))
    def check_feeds(nights: list[str]) -> list[dict]:
        """Record the data-quality metrics of each night's feeds. Out: one summary per night.

        Retries: 2, after 1-2, 2-4 min.
        """
        from dataclasses import asdict
        from datetime import date

        from bonewatch import pipeline
        from bonewatch.config import load_settings

        settings = load_settings()
        out = []
        for n in nights:
            night = date.fromisoformat(n)
            summary = pipeline.quality_check(settings, night, paths=pipeline.partition_paths(settings, night))
            out.append(asdict(summary))
        return out

    nights = resolve_nights()
    evaluated = evaluate_rules.partial(nights=nights).expand(partition=plan_partitions())
    finished = finish_evaluation(nights)
    checked = check_feeds(nights)
    sent = send_alerts(finished)     # its own edge: the trigger rule sees evaluation's state directly
    evaluated >> finished >> checked >> sent


if __name__ == "__main__":
    dag.test()
