"""Bulk upserts keyed on natural keys (no per-row ORM objects, no per-row round trips)."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Connection, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from bonewatch.store.tables import clinical_events, deliveries, lab_results, quarantine

_BATCH = 20000


def _insert(conn: Connection, table: Table):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    sub = frame[columns].astype(object).where(frame[columns].notna(), None)
    return sub.to_dict("records")


def _execute_batched(conn: Connection, statement, frame: pd.DataFrame, columns: list[str]) -> None:
    for start in range(0, len(frame), _BATCH):
        conn.execute(statement, _records(frame.iloc[start:start + _BATCH], columns))


def upsert_results(conn: Connection, rows: pd.DataFrame) -> None:
    """Insert results; a row with the same result id replaces the stored one unless the stored
    status outranks it (a correction is never undone by a late copy of the original)."""
    if rows.empty:
        return
    columns = [c.name for c in lab_results.columns]
    stmt = _insert(conn, lab_results)
    stmt = stmt.on_conflict_do_update(
        index_elements=["result_id"],
        set_={c: stmt.excluded[c] for c in columns if c != "result_id"},
        where=stmt.excluded.status_rank >= lab_results.c.status_rank,
    )
    _execute_batched(conn, stmt, rows, columns)


def insert_events(conn: Connection, rows: pd.DataFrame) -> None:
    if rows.empty:
        return
    columns = [c.name for c in clinical_events.columns]
    stmt = _insert(conn, clinical_events).on_conflict_do_nothing(index_elements=["event_key"])
    _execute_batched(conn, stmt, rows, columns)


def insert_quarantine(conn: Connection, rows: pd.DataFrame) -> None:
    if rows.empty:
        return
    columns = [c.name for c in quarantine.columns]
    stmt = _insert(conn, quarantine).on_conflict_do_nothing(index_elements=["delivery_id", "source_line"])
    _execute_batched(conn, stmt, rows, columns)


def delivery_status(conn: Connection, delivery_id: str) -> str | None:
    return conn.execute(select(deliveries.c.status).where(deliveries.c.delivery_id == delivery_id)).scalar()


def record_delivery(conn: Connection, row: dict) -> None:
    stmt = _insert(conn, deliveries)
    stmt = stmt.on_conflict_do_update(index_elements=["delivery_id"],
                                      set_={k: stmt.excluded[k] for k in row if k != "delivery_id"})
    conn.execute(stmt, [row])
