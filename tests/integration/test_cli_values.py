"""The command line prints stored values as they were sent: rich markup in a patient id or a
summary is text, not markup (it used to fail the whole `bonewatch alerts` table, quoting part of
the id); `bonewatch quarantine` is where the values the dashboard withholds are read; an
unexpected error names its type, never its message."""

from __future__ import annotations

import json

import pytest

from bonewatch import pipeline
from bonewatch.store import db
from tests.integration.alerting import EVENT_HEADER, LAB_HEADER, alert_row, insert_alerts, run_cli

HOSTILE_ID = "ZZ[/bold]01"
HOSTILE_SUMMARY = "[red]SCr[/red] up [link=http://x]here[/link] :smile:"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A migrated SQLite store the CLI reaches through the environment."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", url)
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


def test_alerts_table_prints_markup_in_stored_values_as_text(store):
    insert_alerts(store, alert_row(HOSTILE_ID, "RENAL_HOLD", "high", evidence={"summary": HOSTILE_SUMMARY}),
                  alert_row("000123", "REVIEW_1Y", "medium"))
    done = run_cli("alerts")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert HOSTILE_ID in done.stdout and "000123" in done.stdout
    flat = "".join(done.stdout.split())        # the table may fold a long cell over lines
    assert "".join(HOSTILE_SUMMARY.split()) in flat


def test_quarantine_lists_file_line_and_the_quoted_value(store, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "night.csv").write_text(LAB_HEADER + "000123,R1,2160-0,[bold]abc,mg/dL,2025-06-01T08:00:00,final\n"
                                     "000123,R2,2160-0,1.0,mg/dL,2025-06-01T08:00:00,final\n", "utf-8")
    (inbox / "night.events.csv").write_text(EVENT_HEADER + "000123,sex,2025-06-01,DOE JOHN,\n", "utf-8")
    import os

    from bonewatch.config import load_settings

    summary = pipeline.ingest(load_settings(env=dict(os.environ)), [inbox], partition="2025-06-01")
    assert summary.quarantined == 2
    done = run_cli("quarantine")
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    assert "unparseable value «[bold]abc»" in flat and "unknown sex value «DOE JOHN»" in flat
    assert "night.csv" in flat and "night.events.csv" in flat
    rows = [json.loads(line) for line in run_cli("quarantine", "--format", "json", "--feed", "labs").stdout.splitlines()]
    assert rows == [{"night": "2025-06-01", "feed": "labs", "file": "night.csv", "line": 2,
                     "reason": "unparseable value «[bold]abc»"}]


def test_an_unexpected_error_names_its_type_not_its_message(store, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("duplicate key (patient_id)=(ZZPHINAME 99887766)")

    monkeypatch.setattr(pipeline, "engine_for", broken)
    done = run_cli("alerts")
    assert done.returncode == 1
    assert done.stderr.strip() == "bonewatch: unexpected ValueError (run with --debug for details)"
