"""Migration 0003 (alert audit, re-notify and outbox columns) on both stores: it matches the
table definitions, carries alerts notified before it forward, and downgrades cleanly."""

from __future__ import annotations

from datetime import date, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, create_engine, insert, inspect, select, table

from bonewatch.store import db
from bonewatch.store.tables import alert_audit, alerts, metadata, outbox
from tests.integration.alerting import alert_row

MINE = {("alert_audit", None), ("alerts", "last_notified_night"), ("alerts", "notify_count"),
        ("outbox", "message_key"), ("outbox", "body_text"), ("outbox", "body_html"), ("outbox", "next_attempt_at")}


def _migrate(engine, revision: str, down: bool = False) -> None:
    cfg = db._alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _touches_mine(diff) -> bool:
    """Whether one autogenerate difference concerns a table or column this migration owns."""
    op = diff[0] if isinstance(diff, tuple) else diff[0][0]
    item = diff if isinstance(diff, tuple) else diff[0]
    if op in ("add_table", "remove_table"):
        return (item[1].name, None) in MINE
    if op in ("add_index", "remove_index"):
        return item[1].table.name in {"alert_audit"} or item[1].name == "ux_outbox_kind_key_recipient"
    if op in ("add_column", "remove_column"):
        return (item[2], None) in MINE or (item[2], item[3].name) in MINE
    if op.startswith("modify_"):
        return (item[2], item[3]) in MINE or (item[2], None) in MINE
    return False


def test_migration_matches_the_tables_and_round_trips(db_url):
    engine = db.make_engine(db_url) if db_url.startswith("sqlite") else create_engine(
        db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        _migrate(engine, "0002")
        row = alert_row("000123", "RENAL_HOLD", "high", status="notified")
        row["notified_at"] = datetime(2025, 6, 5, 2, 30)
        legacy = {k: v for k, v in row.items() if k in {c.name for c in alerts.c} - {"last_notified_night", "notify_count"}}
        with engine.begin() as conn:   # the alerts table as 0002 knows it
            conn.execute(insert(table("alerts", *[column(name) for name in legacy])), [legacy])

        db.upgrade(engine)
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
            carried = conn.execute(select(alerts.c.last_notified_night, alerts.c.notify_count)).one()
        assert [d for d in diffs if _touches_mine(d)] == []
        assert tuple(carried) == (date(2025, 6, 5), 1)
        names = inspect(engine).get_table_names()
        assert "alert_audit" in names
        assert {c["name"] for c in inspect(engine).get_columns("outbox")} >= {c.name for c in outbox.c}
        assert {c["name"] for c in inspect(engine).get_columns("alert_audit")} == {c.name for c in alert_audit.c}

        _migrate(engine, "0002", down=True)
        assert "alert_audit" not in inspect(engine).get_table_names()
        assert "notify_count" not in {c["name"] for c in inspect(engine).get_columns("alerts")}
        assert "body_text" not in {c["name"] for c in inspect(engine).get_columns("outbox")}
        db.upgrade(engine)                          # and up again
        assert "alert_audit" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
