"""Bulk upserts keyed on natural keys (no per-row ORM objects, no per-row round trips).

The hot tables (lab results, events) take a fast path per backend:

- PostgreSQL: the chunk is rendered as CSV by pyarrow, `COPY`-ed through psycopg 3 into a temp
  table, then moved with one `INSERT ... SELECT ... ON CONFLICT` (the server does the upsert in
  one statement; the client never builds a Python object per value);
- SQLite: the chunk bound from Arrow in C by the ADBC SQLite driver into a scratch file, loaded
  into an in-memory schema of the store's connection, then the same set-based upsert inside the
  caller's (large) transaction (`_stage_sqlite`; bench/README.md "Arrow writes" for why and how much).
  The patient marks and evaluation records (one row a patient) still use `executemany`.

Every write also marks the patients it touched in `patient_index` (see `PatientMarks`), so the
next evaluation re-reads only them.
"""

from __future__ import annotations

import io
import mmap
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import Connection, Date, DateTime, Float, Integer, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from bonewatch.model import TIMELESS_EVENTS
from bonewatch.store.tables import (
    clinical_events,
    deliveries,
    delivery_codes,
    lab_results,
    patient_index,
    patient_refs,
    quarantine,
    source_watermarks,
)

_BATCH = 20000
_STAGE = "bw_stage"        # SQLite: the in-memory schema a chunk is staged in (`_stage_sqlite`)
_SCRATCH_PREFIX = "bonewatch-stage-"   # ... through a scratch file of this name in the temp folder
_EMPTY_IMAGE: bytes | None = None      # an empty database's image, to free the stage after a chunk
_SCRATCH_STALE = 3600                  # seconds: a scratch file this old belongs to no running load
_COPY_PIECE = 8 << 20      # bytes handed to COPY at a time


def _insert(conn: Connection, table: Table):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    sub = frame[columns].astype(object).where(frame[columns].notna(), None)
    return sub.to_dict("records")


def _execute_batched(conn: Connection, statement, frame: pd.DataFrame, columns: list[str]) -> None:
    for start in range(0, len(frame), _BATCH):
        conn.execute(statement, _records(frame.iloc[start:start + _BATCH], columns))


# --------------------------------------------------------------------------------------------
# columnar rendering shared by both backends


def _arrow_column(series: pd.Series, sql_type) -> pa.Array:
    """One column as Arrow, typed by its SQL column (dates accept date objects or timestamps)."""
    if isinstance(sql_type, DateTime):
        values = pd.to_datetime(series).astype("datetime64[us]")
        return pa.array(values, type=pa.timestamp("us"), from_pandas=True)
    if isinstance(sql_type, Date):
        values = pd.to_datetime(series).astype("datetime64[s]").dt.normalize()
        return pa.array(values, type=pa.timestamp("s"), from_pandas=True).cast(pa.date32())
    if isinstance(sql_type, Float):
        return pa.array(pd.to_numeric(series), type=pa.float64(), from_pandas=True)
    if isinstance(sql_type, Integer):
        return pa.array(series, type=pa.int64(), from_pandas=True)
    # every missing value (None, NaN, pd.NA) -> None in one step: astype + notna + where cost ~0.1 ms
    # a column however short, which a one-row delivery paid a dozen times
    return pa.array(series.to_numpy(dtype=object, na_value=None), type=pa.string(), from_pandas=True)


def _arrow_table(frame: pd.DataFrame, table: Table, columns: list[str]) -> pa.Table:
    return pa.table({name: _arrow_column(frame[name], table.c[name].type) for name in columns})


_CLOCK = np.array([f" {h:02d}:{m:02d}:{sec:02d}.000000" for h in range(24) for m in range(60) for sec in range(60)],
                  dtype=object)


def _format_datetimes(values: np.ndarray, with_time: bool) -> list:
    """datetime64 values -> 'YYYY-MM-DD HH:MM:SS.ffffff' (or 'YYYY-MM-DD') strings, None for NaT.

    Each distinct day is formatted once and the clock time comes from a table of the day's
    86,400 seconds: numpy's and Arrow's strftime cost a few microseconds a value on this
    hardware, which at ten million rows is most of a minute."""
    stamps = values.astype("datetime64[us]")
    missing = np.isnat(stamps)
    stamps = np.where(missing, np.datetime64("1970-01-01T00:00:00", "us"), stamps)
    days = stamps.astype("datetime64[D]")
    uniques, codes = np.unique(days, return_inverse=True)
    text = np.array([str(d) for d in uniques], dtype=object)[codes.ravel()]
    if with_time:
        micros = (stamps - days.astype("datetime64[us]")).astype("int64")
        fraction = micros % 1_000_000
        text = text + _CLOCK[micros // 1_000_000]
        for i in np.flatnonzero(fraction):
            text[i] = text[i][:20] + f"{fraction[i]:06d}"
    if missing.any():
        text[missing] = None
    return text.tolist()


def _sqlite_rows(data: pa.Table, table: Table):
    """Rows as tuples of Python scalars, dates and times as SQLAlchemy's SQLite text format
    ('YYYY-MM-DD HH:MM:SS.ffffff', 'YYYY-MM-DD'), so reads through SQLAlchemy see the same.
    An iterator: executemany builds one tuple at a time, not a list of a whole chunk's tuples."""
    columns = []
    for name in data.column_names:
        array = data.column(name)
        sql_type = table.c[name].type
        if isinstance(sql_type, DateTime | Date):
            values = array.to_numpy(zero_copy_only=False)
            columns.append(_format_datetimes(values, isinstance(sql_type, DateTime)))
        elif pa.types.is_string(array.type):
            columns.append(array.to_numpy(zero_copy_only=False).tolist())
        else:
            columns.append(array.to_pylist())
    return zip(*columns, strict=True)


def _copy_into_temp(conn: Connection, data: pa.Table, table: Table) -> str:
    """COPY an Arrow table into a session temp table shaped like `table`; return its name."""
    temp = f"_bw_load_{table.name}"
    raw = conn.connection.driver_connection
    columns = ", ".join(data.column_names)
    with raw.cursor() as cur:
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {temp} (LIKE {table.name} INCLUDING DEFAULTS)")
        cur.execute(f"TRUNCATE {temp}")
        buffer = io.BytesIO()
        pacsv.write_csv(data, buffer, write_options=pacsv.WriteOptions(include_header=False))
        view = buffer.getbuffer()
        with cur.copy(f"COPY {temp} ({columns}) FROM STDIN (FORMAT csv)") as copy:
            for start in range(0, len(view), _COPY_PIECE):
                copy.write(view[start:start + _COPY_PIECE])
        del view
    return temp


def _stage_sqlite(conn: Connection, data: pa.Table, table: Table) -> str:
    """Put an Arrow table where SQLite's own connection can select it; return the select list and
    FROM clause of its rows in their order (`<columns> FROM bw_stage.rows WHERE true ORDER BY rowid`;
    WHERE true: SQLite's grammar needs one before an upsert's ON CONFLICT).

    The ADBC SQLite driver binds the Arrow columns in C into a scratch database file of its own (it
    cannot write into the store: the file's transaction holds the store's write lock until the end
    of the delivery); that file's image is then loaded into an in-memory schema of the store's
    connection (`sqlite3.Connection.deserialize`, allowed inside a transaction, unlike DETACH),
    so every INSERT ... SELECT stays in the delivery's one transaction and a failure leaves nothing
    in the store. The scratch file is removed at once (a process killed in that second leaves one
    chunk's, swept by a later load: `prepare_bulk`); the in-memory schema dies with the connection.

    ADBC writes timestamps as ISO 8601 with a 'T'; SQLAlchemy's SQLite format has a space there
    (dates are the same 'YYYY-MM-DD' in both)."""
    import adbc_driver_sqlite.dbapi as adbc_sqlite

    raw = conn.connection.driver_connection
    if not any(row[1] == _STAGE for row in raw.execute("PRAGMA database_list")):
        raw.execute(f"ATTACH DATABASE ':memory:' AS {_STAGE}")
    handle, scratch = tempfile.mkstemp(prefix=_SCRATCH_PREFIX, suffix=".db")
    os.close(handle)
    try:
        # the driver opens the empty file as an empty database, keeping mkstemp's mode 0600 (the
        # rows carry patient ids). Autocommit: the pragmas must precede any transaction (the
        # driver makes the ingest one transaction anyway).
        with adbc_sqlite.connect(scratch, autocommit=True) as stage, stage.cursor() as cur:
            for pragma in ("journal_mode = OFF", "synchronous = OFF"):   # a scratch file: no crash safety
                cur.execute(f"PRAGMA {pragma}")
                cur.fetchall()
            cur.adbc_ingest("rows", data, mode="create")
        with open(scratch, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
            raw.deserialize(image, name=_STAGE)     # SQLite's own copy; no Python bytes in between
    finally:
        Path(scratch).unlink(missing_ok=True)
    select_list = ", ".join(f"substr({name}, 1, 10) || ' ' || substr({name}, 12)"
                            if isinstance(table.c[name].type, DateTime) else name
                            for name in data.column_names)
    return f"{select_list} FROM {_STAGE}.rows WHERE true ORDER BY rowid"


def _unstage(conn: Connection) -> None:
    """Free the staged chunk now rather than when the next one replaces it (peak memory)."""
    global _EMPTY_IMAGE
    if _EMPTY_IMAGE is None:
        empty = sqlite3.connect(":memory:")
        empty.execute("PRAGMA user_version = 1")   # one page: an image of nothing cannot be loaded
        _EMPTY_IMAGE = empty.serialize()
        empty.close()
    conn.connection.driver_connection.deserialize(_EMPTY_IMAGE, name=_STAGE)


def _bulk_upsert(conn: Connection, frame: pd.DataFrame, table: Table, key: list[str],
                 update: list[str] | None, where: str | None = None) -> None:
    """INSERT every row; on a key conflict update `update` columns (when `where` holds), or do
    nothing when `update` is None. One INSERT ... SELECT per chunk from a staged copy of it."""
    columns = [c.name for c in table.columns if c.name in frame.columns]
    data = _arrow_table(frame, table, columns)
    names = ", ".join(columns)
    conflict = f"ON CONFLICT ({', '.join(key)}) " + (
        "DO NOTHING" if not update else
        "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in update) + (f" WHERE {where}" if where else ""))
    if conn.dialect.name == "postgresql":
        temp = _copy_into_temp(conn, data, table)
        # WHERE true: SQLite's grammar needs it after SELECT in an upsert; harmless here too.
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {temp} WHERE true {conflict}")
        return
    staged = _stage_sqlite(conn, data, table)
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) SELECT {staged} {conflict}")
    _unstage(conn)


def _sweep_scratch() -> None:
    """Remove the scratch files of loads killed while staging a chunk (their `finally` never ran).
    Only hour-old ones: a running load's file lives for about a second."""
    cutoff = time.time() - _SCRATCH_STALE
    for path in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*.db"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:     # another load swept it first
            continue


def prepare_bulk(conn: Connection) -> None:
    """Before a large load: sweep stale scratch files (`_stage_sqlite`); a bigger SQLite page cache,
    64 MiB (the patient index is updated in random order; the default 2 MB cache thrashes)."""
    _sweep_scratch()
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA cache_size = -65536")   # 64 MiB


# --------------------------------------------------------------------------------------------
# patient marks: which patients the next evaluation must re-read


class PatientMarks:
    """Patients touched by a load and the earliest day of their new data, accumulated over the
    chunks of a file and written once (`flush`), so a 10 M-row file costs one upsert per patient."""

    def __init__(self) -> None:
        self._parts: list[pd.Series] = []

    def add(self, patient_id: pd.Series, day: pd.Series) -> None:
        if len(patient_id):
            days = pd.to_datetime(pd.Series(np.asarray(day), index=None)).dt.normalize()
            part = days.groupby(np.asarray(patient_id, dtype=object)).min()
            self._parts.append(part)
            if len(self._parts) > 16:   # keep the accumulator small
                self._parts = [self._reduce()]

    def _reduce(self) -> pd.Series:
        joined = pd.concat(self._parts)
        return joined.groupby(level=0).min()

    def flush(self, conn: Connection) -> int:
        """Upsert the marks: dirty_from = the earlier of stored and new, dirty_seq + 1."""
        if not self._parts:
            return 0
        marks = self._reduce()
        self._parts = []
        frame = pd.DataFrame({"patient_id": marks.index.astype(str), "dirty_from": marks.to_numpy(),
                              "dirty_seq": 1})
        _mark(conn, frame)
        return len(frame)


def _mark(conn: Connection, frame: pd.DataFrame) -> None:
    t = patient_index.name
    update = (f"ON CONFLICT (patient_id) DO UPDATE SET "
              f"dirty_from = CASE WHEN {t}.dirty_from IS NULL OR excluded.dirty_from < {t}.dirty_from "
              f"THEN excluded.dirty_from ELSE {t}.dirty_from END, dirty_seq = {t}.dirty_seq + 1")
    data = _arrow_table(frame, patient_index, ["patient_id", "dirty_from", "dirty_seq"])
    if conn.dialect.name == "postgresql":
        temp = _copy_into_temp(conn, data, patient_index)
        conn.exec_driver_sql(f"INSERT INTO {t} (patient_id, dirty_from, dirty_seq) "
                             f"SELECT patient_id, dirty_from, dirty_seq FROM {temp} WHERE true {update}")
        return
    conn.connection.driver_connection.executemany(
        f"INSERT INTO {t} (patient_id, dirty_from, dirty_seq) VALUES (?, ?, ?) {update}",
        _sqlite_rows(data, patient_index))


def mark_patients(conn: Connection, patient_id: Iterable[str], day: Iterable) -> int:
    """Mark patients as changed from `day` on (one call; see PatientMarks for many chunks)."""
    marks = PatientMarks()
    marks.add(pd.Series(list(patient_id), dtype=object), pd.Series(list(day)))
    return marks.flush(conn)


# --------------------------------------------------------------------------------------------
# the feeds' tables


def dedupe_results(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per result id: the last of those with the highest status rank, the same rule the
    store applies across deliveries (a late copy of an original never undoes a correction)."""
    if not rows["result_id"].duplicated().any():
        return rows
    ranked = rows.iloc[np.argsort(rows["status_rank"].to_numpy(), kind="stable")]
    return ranked[~ranked["result_id"].duplicated(keep="last")].sort_index()


def upsert_results(conn: Connection, rows: pd.DataFrame, marks: PatientMarks | None = None) -> None:
    """Insert results; a row with the same result id replaces the stored one unless the stored
    status outranks it (a correction is never undone by a late copy of the original).

    The patients touched are marked for the next evaluation: in `marks` when given (flushed by
    the caller at the end of the file), else right away."""
    if rows.empty:
        return
    rows = dedupe_results(rows)
    columns = [c.name for c in lab_results.columns]
    _bulk_upsert(conn, rows, lab_results, ["result_id"], [c for c in columns if c != "result_id"],
                 where="excluded.status_rank >= lab_results.status_rank")
    _note(conn, marks, rows["patient_id"], rows["collected_date"])


#: the day a timeless fact marks its patient from: every night may see it
_TIMELESS_DAY = pd.Timestamp("1900-01-01")


def insert_events(conn: Connection, rows: pd.DataFrame, marks: PatientMarks | None = None) -> None:
    """Insert events (a re-sent event has the same key and changes nothing); marks patients.

    Birth date and sex are timeless (SPEC 2.5): the store keeps one of each per patient, the one
    of the latest delivery (within a delivery, the latest recorded, then the last line), and a
    new or changed one marks the patient from the earliest day, so every night is evaluated again."""
    if rows.empty:
        return
    rows = rows[~rows["event_key"].duplicated(keep="first")]   # as ON CONFLICT DO NOTHING across chunks
    timeless = rows["event_type"].isin(TIMELESS_EVENTS).to_numpy()
    if timeless.any():
        facts = (rows[timeless].sort_values(["occurred_at", "source_line"], kind="stable")
                 .drop_duplicates(["patient_id", "event_type"], keep="last"))
        changed = _replace_timeless(conn, facts)
        rows = pd.concat([rows[~timeless], facts])
        if len(changed):
            _note(conn, marks, changed, pd.Series(_TIMELESS_DAY, index=changed.index))
    _bulk_upsert(conn, rows, clinical_events, ["event_key"], None)
    plain = ~rows["event_type"].isin(TIMELESS_EVENTS).to_numpy()
    _note(conn, marks, rows["patient_id"][plain], rows["occurred_date"][plain])


def _replace_timeless(conn: Connection, facts: pd.DataFrame) -> pd.Series:
    """Delete the stored birth dates / sexes these rows supersede; return the patients whose fact
    is new or different (the others' re-sent value changes nothing they are judged on)."""
    e = clinical_events.c
    stored: dict[tuple[str, str], set[str]] = {}
    doomed: list[str] = []
    replaced = set(zip(facts["patient_id"], facts["event_type"], strict=True))
    patients = facts["patient_id"].drop_duplicates().tolist()
    for start in range(0, len(patients), 5000):   # under SQLite's bound-parameter limit
        part = patients[start:start + 5000]
        for key, pid, etype, value in conn.execute(
                select(e.event_key, e.patient_id, e.event_type, e.value)
                .where(e.event_type.in_(TIMELESS_EVENTS), e.patient_id.in_(part))).all():
            if (pid, etype) in replaced:
                stored.setdefault((pid, etype), set()).add(value)
                doomed.append(key)
    keep = set(facts["event_key"])
    doomed = [k for k in doomed if k not in keep]
    for start in range(0, len(doomed), 5000):
        conn.execute(clinical_events.delete().where(e.event_key.in_(doomed[start:start + 5000])))
    same = [stored.get((p, t)) == {v} for p, t, v in
            zip(facts["patient_id"], facts["event_type"], facts["value"], strict=True)]
    return facts["patient_id"][~np.array(same, dtype=bool)].drop_duplicates()


def insert_delivery_codes(conn: Connection, rows: pd.DataFrame) -> None:
    """A delivery's per-code counts of results skipped for their code (`delivery_codes`)."""
    if rows.empty:
        return
    columns = [c.name for c in delivery_codes.columns]
    frame = rows.copy()
    for column in ("first_collected", "last_collected"):
        frame[column] = pd.to_datetime(frame[column]).dt.date.astype(object).where(frame[column].notna(), None)
    stmt = _insert(conn, delivery_codes).on_conflict_do_nothing(index_elements=["delivery_id", "code"])
    _execute_batched(conn, stmt, frame, columns)


def _note(conn: Connection, marks: PatientMarks | None, patient_id: pd.Series, day: pd.Series) -> None:
    if marks is not None:
        marks.add(patient_id, day)
    else:
        one = PatientMarks()
        one.add(patient_id, day)
        one.flush(conn)


def insert_quarantine(conn: Connection, rows: pd.DataFrame) -> None:
    if rows.empty:
        return
    columns = [c.name for c in quarantine.columns]
    stmt = _insert(conn, quarantine).on_conflict_do_nothing(index_elements=["delivery_id", "source_line"])
    _execute_batched(conn, stmt, rows, columns)


def upsert_patient_refs(conn: Connection, rows: pd.DataFrame) -> None:
    """FHIR `Patient/<id>` -> MRN (columns ref, patient_id, delivery_id); the latest delivery wins."""
    if rows.empty:
        return
    rows = rows.drop_duplicates("ref", keep="last")
    stmt = _insert(conn, patient_refs)
    stmt = stmt.on_conflict_do_update(index_elements=["ref"], set_={"patient_id": stmt.excluded.patient_id,
                                                                    "delivery_id": stmt.excluded.delivery_id})
    _execute_batched(conn, stmt, rows, ["ref", "patient_id", "delivery_id"])


def lookup_patient_refs(conn: Connection, refs: Iterable[str]) -> dict[str, str]:
    """The MRNs of Patient references delivered earlier, in bulk."""
    wanted = sorted(set(refs))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 900):
        piece = wanted[start:start + 900]
        found.update(conn.execute(select(patient_refs.c.ref, patient_refs.c.patient_id)
                                  .where(patient_refs.c.ref.in_(piece))).tuples().all())
    return found


def load_watermark(conn: Connection, source: str) -> tuple[str, str] | None:
    """(watermark text, kind) of a SQL source, or None before its first pull."""
    row = conn.execute(select(source_watermarks.c.watermark, source_watermarks.c.kind)
                       .where(source_watermarks.c.source == source)).first()
    return (row[0], row[1]) if row else None


def save_watermark(conn: Connection, row: dict) -> None:
    """A SQL source's high-water mark (source, watermark, kind, rows_read, updated_at)."""
    stmt = _insert(conn, source_watermarks)
    stmt = stmt.on_conflict_do_update(index_elements=["source"],
                                      set_={k: stmt.excluded[k] for k in row if k != "source"})
    conn.execute(stmt, row)


def delivery_status(conn: Connection, delivery_id: str) -> str | None:
    return conn.execute(select(deliveries.c.status).where(deliveries.c.delivery_id == delivery_id)).scalar()


def delivered_on_night(conn: Connection, feed: str, partition: str) -> bool:
    """Whether the ledger holds any delivery of this feed for this night."""
    return conn.execute(select(deliveries.c.delivery_id).where(
        deliveries.c.feed == feed, deliveries.c.partition == partition).limit(1)).first() is not None


def record_delivery(conn: Connection, row: dict) -> None:
    stmt = _insert(conn, deliveries)
    stmt = stmt.on_conflict_do_update(index_elements=["delivery_id"],
                                      set_={k: stmt.excluded[k] for k in row if k != "delivery_id"})
    conn.execute(stmt, [row])


def record_evaluation(conn: Connection, evaluated: pd.DataFrame, as_of, digest: str) -> None:
    """After an evaluation: for each evaluated patient (columns patient_id, dirty_seq as read
    before, next_due_on) store the night, the rule digest and the next due night, and clear its
    dirty mark unless a load marked it again meanwhile (dirty_seq moved on)."""
    if evaluated.empty:
        return
    t = patient_index.name
    frame = pd.DataFrame({"patient_id": evaluated["patient_id"].astype(str).to_numpy(),
                          "dirty_seq": evaluated["dirty_seq"].astype("int64").to_numpy(),
                          "next_due_on": evaluated["next_due_on"].to_numpy(),
                          "evaluated_on": pd.Timestamp(as_of), "evaluated_with": digest})
    columns = ["patient_id", "dirty_seq", "next_due_on", "evaluated_on", "evaluated_with"]
    data = _arrow_table(frame, patient_index, columns)
    assign = ("evaluated_on = s.evaluated_on, evaluated_with = s.evaluated_with, next_due_on = s.next_due_on, "
              f"dirty_from = CASE WHEN {t}.dirty_seq = s.dirty_seq THEN NULL ELSE {t}.dirty_from END")
    if conn.dialect.name == "postgresql":
        temp = _copy_into_temp(conn, data, patient_index)
        conn.exec_driver_sql(f"UPDATE {t} SET {assign} FROM {temp} AS s WHERE {t}.patient_id = s.patient_id")
        return
    rows = _sqlite_rows(data, patient_index)
    conn.connection.driver_connection.executemany(
        f"UPDATE {t} SET evaluated_on = ?4, evaluated_with = ?5, next_due_on = ?3, "
        f"dirty_from = CASE WHEN dirty_seq = ?2 THEN NULL ELSE dirty_from END WHERE patient_id = ?1", rows)
