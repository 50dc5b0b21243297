"""A rerun with nothing new imports no data stack (issue 16), on both stores: the ledger check of
every file and the evaluation's "nobody dirty or due" are answered with SQLAlchemy alone, in a fresh
process, as Airflow or cron would start it. What is new is still parsed and validated with Great
Expectations, and a night evaluated through the short path leaves the alerts a full evaluation
leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta

from sqlalchemy import func, select

from bonewatch import pipeline, synth
from bonewatch.store.tables import alerts, deliveries, patient_index
from tests.integration.test_incremental import alert_state

#: what a rerun must not import: the data stack, Great Expectations, the chart libraries, and
#: Alembic (the store's revision check is one query: `store.db.HEAD`)
HEAVY = ("pandas", "numpy", "pyarrow", "great_expectations", "matplotlib", "plotly", "alembic")
#: `bonewatch ARGS...` in a fresh interpreter that prints, on exit, which of HEAVY it imported
PROBE = f"""
import atexit, json, sys
atexit.register(lambda: print("imported:", json.dumps([n for n in {HEAVY!r} if n in sys.modules])))
from bonewatch.cli import main
main(sys.argv[1:])
"""


def bonewatch(*args: str) -> tuple[str, list[str]]:
    """Run the CLI in a fresh process (the environment carries the store's URL): its output, and
    the heavy packages it imported."""
    run = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    *output, last = run.stdout.strip().splitlines()
    assert last.startswith("imported: ")
    return "\n".join(output), json.loads(last.removeprefix("imported: "))


def one_night(settings, tmp_path) -> tuple[dict, date]:
    """A store with a cohort's history and its first night ingested and evaluated."""
    feeds = tmp_path / "feeds"
    manifest = synth.generate(feeds, patients=20, seed=3, last_night=date(2025, 6, 30), nights=14)
    night = date.fromisoformat(manifest["first_night"])
    pipeline.ingest(settings, [feeds / "history", feeds / "inbox" / night.isoformat()])
    assert pipeline.evaluate(settings, night).patients == manifest["patients"]
    return {"history": feeds / "history", "night": feeds / "inbox" / night.isoformat()}, night


def test_a_rerun_imports_no_data_stack(engine, settings, tmp_path):
    paths, night = one_night(settings, tmp_path)
    with engine.connect() as conn:
        files = conn.execute(select(func.count()).select_from(deliveries)).scalar()

    out, imported = bonewatch("ingest", str(paths["history"]), str(paths["night"]))
    assert f"{files} file(s): 0 rows accepted" in out and f"{files} already ingested" in out
    assert imported == []
    out, imported = bonewatch("evaluate", "--as-of", night.isoformat())
    assert out == f"{night}: 0 patients, 0 findings (none); 0 new alert(s), 0 resolved"
    assert imported == []
    out, imported = bonewatch("evaluate", "--as-of", night.isoformat(), "--partition", "1/2")
    assert out.startswith(f"{night} partition 1/2: 0 patients") and imported == []

    _, imported = bonewatch("--help")
    assert imported == []


def test_new_rows_are_still_parsed_and_validated_with_great_expectations(engine, settings, tmp_path):
    _, night = one_night(settings, tmp_path)
    later = tmp_path / "later.csv"
    later.write_text("patient_id,result_id,loinc,value,unit,collected_at,status\n"
                     f"P-NEW,lean-1,2160-0,1.1,mg/dL,{night}T08:00:00,final\n"
                     f"P-NEW,lean-2,2160-0,999,mg/dL,{night}T09:00:00,final\n")
    out, imported = bonewatch("ingest", str(later))
    assert "later.csv: 1 accepted, 0 not monitored, 1 quarantined" in out
    assert {"pandas", "pyarrow", "great_expectations"} <= set(imported)
    with engine.connect() as conn:
        passed, failed = conn.execute(select(deliveries.c.expectations_passed, deliveries.c.expectations_failed)
                                      .where(deliveries.c.file_name == "later.csv")).one()
    assert passed > 0 and failed == 1       # GX ran on the chunk: the implausible value failed its range
    out, imported = bonewatch("evaluate", "--as-of", night.isoformat())
    assert out.startswith(f"{night}: 1 patients") and "pandas" in imported


def test_a_night_with_nobody_dirty_or_due_leaves_the_alerts_of_a_full_evaluation(engine, settings, tmp_path):
    """The short path still marks the open alerts seen that night, as the evaluation of nobody did."""
    _, night = one_night(settings, tmp_path)
    with engine.connect() as conn:
        first_due = conn.execute(select(func.min(patient_index.c.next_due_on))).scalar()
        open_alerts = conn.execute(select(func.count()).select_from(alerts).where(alerts.c.status == "open")).scalar()
    quiet = date.fromisoformat(str(first_due)[:10]) - timedelta(days=1)
    assert quiet > night and open_alerts > 0       # the cohort gives such a night, with alerts open

    short = pipeline.evaluate(settings, quiet)
    assert short.patients == 0
    with engine.connect() as conn:
        seen = set(conn.execute(select(alerts.c.last_seen_on).where(alerts.c.status == "open")).scalars())
    assert {str(value)[:10] for value in seen} == {quiet.isoformat()}
    state = alert_state(engine)
    assert pipeline.evaluate(settings, quiet, full=True).patients > 0
    assert alert_state(engine) == state


def test_the_short_path_reports_an_evaluation_of_nobody(engine, settings):
    """On an empty store the incremental evaluation takes the short path and the full one the
    long path: their summaries are the same."""
    night = date(2025, 6, 30)
    assert pipeline.evaluate(settings, night).as_dict() == pipeline.evaluate(settings, night, full=True).as_dict()
    part = pipeline.evaluate(settings, night, partition=(0, 2)).as_dict()
    assert part == pipeline.evaluate(settings, night, partition=(0, 2), full=True).as_dict()
    assert part["partition"] == "0/2"
