"""Shared helpers for the alerting tests (outbox, reminders, acknowledgement app, export): real
feeds written as CSV and loaded through the real ingest, alert rows as evaluate writes them, the
CLI in a subprocess, and the web app served by uvicorn in a thread (the httpx real-server
pattern)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import date
from pathlib import Path

import uvicorn
from sqlalchemy import insert, select

from bonewatch import pipeline
from bonewatch.config import Settings
from bonewatch.model import alert_id
from bonewatch.store.tables import alert_audit, alerts, outbox

SECRET = "test-ack-secret-not-for-production"
LAB_HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
EVENT_HEADER = "patient_id,event_type,occurred_at,value,detail\n"


def alert_row(patient_id: str, rule: str, severity: str, *, evidence: dict | None = None,
              episode: str = "2025-06-05", status: str = "open", night: date = date(2025, 6, 5),
              action: str = "Hold the bisphosphonate.", citation: str = "Zoledronic acid label") -> dict:
    """An alerts-table row as evaluate writes it."""
    return {"alert_id": alert_id(patient_id, rule, episode), "patient_id": patient_id, "rule": rule,
            "rule_version": "1", "severity": severity, "episode": episode, "observed_on": night,
            "raised_on": night, "last_seen_on": night, "resolved_on": None, "action": action,
            "citation": citation, "evidence": json.dumps(evidence or {"summary": f"{rule} for test"}),
            "status": status, "notified_at": None, "acknowledged_by": None, "acknowledged_at": None}


def insert_alerts(engine, *rows: dict) -> None:
    with engine.begin() as conn:
        conn.execute(insert(alerts), list(rows))


def alert_rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["alert_id"]: dict(r) for r in conn.execute(select(alerts)).mappings()}


def outbox_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(outbox).order_by(outbox.c.recipient, outbox.c.night, outbox.c.message_id)).mappings()]


def audit_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(alert_audit).order_by(alert_audit.c.audit_id)).mappings()]


def write_feeds(folder: Path, labs: list[str], events: list[str], name: str = "feed") -> Path:
    """A lab CSV and an events CSV (rows without header) in `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if labs:
        (folder / f"{name}.csv").write_text(LAB_HEADER + "".join(r + "\n" for r in labs), "utf-8")
    if events:
        (folder / f"{name}.events.csv").write_text(EVENT_HEADER + "".join(r + "\n" for r in events), "utf-8")
    return folder


def ingest(settings: Settings, folder: Path) -> None:
    summary = pipeline.ingest(settings, [folder])
    assert summary.failed_files == 0 and summary.quarantined == 0, summary


def parts(message) -> tuple[str, str]:
    """(plain text, HTML) of a caught message."""
    return (message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real `bonewatch` entry point (`bonewatch.cli.main`, exit code and one-line errors
    included), run in this process with this test's BONEWATCH_* environment: the same code path
    as the installed command without paying a fresh interpreter's imports each call."""
    from bonewatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess([sys.executable, "-m", "bonewatch.cli", *args], code, out.getvalue(),
                                       err.getvalue())


@contextmanager
def served(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:        # readiness, not a timing assumption: the loop ends when it is up
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            thread.join(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
