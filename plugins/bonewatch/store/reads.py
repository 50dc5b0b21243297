"""Bulk reads of history for the rule engine, and the evaluation index.

History is read per batch of patients (the rules need each patient's whole history, and nothing
but it), the batch's ids driving the patient index:

- `History` (what evaluation uses). PostgreSQL: an ADBC connection of its own
  (`adbc-driver-postgresql`), the ids ingested as an Arrow temp table, the query read as
  `COPY ... (FORMAT binary)` straight into Arrow: no Python object per value. SQLite: as below
  (why not `adbc-driver-sqlite`: see `History`).
- `load_patients(conn, ...)`: through a SQLAlchemy connection (so inside its transaction), a
  temp table of ids: PostgreSQL `COPY ... TO STDOUT` as CSV parsed by pyarrow; SQLite one query
  on the driver cursor, its rows turned into Arrow 100,000 at a time.

SQLite's dates and times (SQLAlchemy's text format) are parsed vectorised in Arrow.

Text columns come back as pandas' `str` dtype, instants as datetime64[ns], calendar days as
datetime64[ns] at midnight.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import URL, Connection, Engine, select

from bonewatch.model import TIMELESS_EVENTS, partition_of
from bonewatch.store.pending import to_evaluate
from bonewatch.store.tables import clinical_events, lab_results, patient_index

RULE_ANALYTES = ["creatinine", "alp", "bsap_activity", "bsap_mass", "calcium", "albumin", "ggt", "weight",
                 "urine_albumin_24h", "urine_albumin_spot", "urine_albumin_ratio"]

LAB_COLUMNS = {"result_id": "text", "patient_id": "text", "analyte": "text", "value": "float",
               "censor": "text", "unit": "text", "collected_at": "instant", "collected_date": "day",
               "status": "text", "collected_basis": "text"}
EVENT_COLUMNS = {"patient_id": "text", "event_type": "text", "occurred_at": "instant",
                 "occurred_date": "day", "value": "text", "detail": "text"}
_BATCH_TABLE = "_bw_eval_batch"


def load_history(conn: Connection, as_of: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every patient's results and events collected on or before `as_of` (calendar day).

    Small stores and tests only: it holds the whole store in memory. The pipeline reads in
    patient batches with `load_patients`."""
    labs, events = load_patients(conn, None)
    cut = pd.Timestamp(as_of)
    return labs[labs["collected_date"] <= cut].reset_index(drop=True), visible_events(events, as_of)


def visible_events(events: pd.DataFrame, as_of: date) -> pd.DataFrame:
    """The events a night sees: those that happened by `as_of`, and the timeless facts (birth date,
    sex: SPEC 2.5) whenever they were recorded."""
    keep = (events["occurred_date"] <= pd.Timestamp(as_of)) | events["event_type"].isin(TIMELESS_EVENTS)
    return events[keep].reset_index(drop=True)


def load_patients(conn: Connection, patient_ids: Sequence[str] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole history (every date) of these patients (None: of every patient): rule analytes'
    results and all events, as DataFrames with the dtypes the rules expect."""
    if patient_ids is not None:
        _fill_batch(conn, patient_ids)
    analytes = ", ".join(f"'{a}'" for a in RULE_ANALYTES)   # constants, not user input
    labs = _query(conn, lab_results.name, LAB_COLUMNS, f"t.analyte IN ({analytes})", patient_ids is not None)
    events = _query(conn, clinical_events.name, EVENT_COLUMNS, "1 = 1", patient_ids is not None)
    return labs, events


def _fill_batch(conn: Connection, patient_ids: Sequence[str]) -> None:
    ids = [(str(p),) for p in dict.fromkeys(patient_ids)]
    if conn.dialect.name == "postgresql":
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_BATCH_TABLE} (patient_id text PRIMARY KEY)")
            cur.execute(f"TRUNCATE {_BATCH_TABLE}")
            with cur.copy(f"COPY {_BATCH_TABLE} (patient_id) FROM STDIN") as copy:
                for (pid,) in ids:
                    copy.write_row((pid,))
            cur.execute(f"ANALYZE {_BATCH_TABLE}")
        return
    raw = conn.connection.driver_connection
    raw.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_BATCH_TABLE} (patient_id TEXT PRIMARY KEY)")
    raw.execute(f"DELETE FROM {_BATCH_TABLE}")
    raw.executemany(f"INSERT INTO {_BATCH_TABLE} (patient_id) VALUES (?)", ids)


_ARROW = {"text": pa.string(), "float": pa.float64(), "instant": pa.timestamp("us"), "day": pa.timestamp("us")}


def _query(conn: Connection, table: str, columns: dict[str, str], where: str, batch: bool) -> pd.DataFrame:
    """The batch drives the patient index, one index probe a patient: left to themselves both
    planners read the whole table once a batch (SQLite scans it and probes the batch; PostgreSQL
    hash-joins a sequential scan, or merge-joins the index from its first key), which on a
    10 M-row store is 40 full reads for a backfill and 14 for a night, growing with the store
    instead of with the patients read."""
    names = ", ".join(f"t.{c}" for c in columns)
    if conn.dialect.name == "postgresql":
        if not batch:
            return _copy_out(conn, f"SELECT {names} FROM {table} AS t WHERE {where}", columns)
        # LATERAL ... OFFSET 0 keeps the subquery from being flattened into a hash join; the
        # nested loop's large cost estimate would also switch JIT compilation on (~0.1 s a batch)
        conn.exec_driver_sql("SET LOCAL jit = off")
        return _copy_out(conn, f"SELECT {names} FROM {_BATCH_TABLE} AS b CROSS JOIN LATERAL "
                               f"(SELECT * FROM {table} AS t WHERE t.patient_id = b.patient_id AND {where} "
                               f"OFFSET 0) AS t", columns)
    # SQLite: CROSS JOIN fixes the loop order
    source = f"{_BATCH_TABLE} AS b CROSS JOIN {table} AS t" if batch else f"{table} AS t"
    sql = f"SELECT {names} FROM {source} WHERE {where}" + (" AND t.patient_id = b.patient_id" if batch else "")
    cur = conn.connection.driver_connection.execute(sql)
    parts = []
    while rows := cur.fetchmany(100_000):   # a bounded number of Python objects at a time
        values = list(zip(*rows, strict=True))
        # SQLAlchemy stores SQLite dates and times as ISO text: Arrow parses them in C
        parts.append(pa.table({name: pa.array(column, type=pa.string() if kind in ("instant", "day") else _ARROW[kind])
                               for (name, kind), column in zip(columns.items(), values, strict=True)}))
    if not parts:
        parts = [pa.table({name: pa.array([], type=pa.string()) for name in columns})]
    return _typed(pa.concat_tables(parts), columns)


def _copy_out(conn: Connection, sql: str, columns: dict[str, str]) -> pd.DataFrame:
    raw = conn.connection.driver_connection
    buffer = io.BytesIO()
    with raw.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT csv)") as copy:
        for block in copy:
            buffer.write(block)
    if buffer.tell() == 0:
        return _typed(pa.table({name: pa.array([], type=pa.string()) for name in columns}), columns)
    buffer.seek(0)
    table = pacsv.read_csv(buffer, read_options=pacsv.ReadOptions(column_names=list(columns)),
                           convert_options=pacsv.ConvertOptions(
                               column_types={name: _ARROW[kind] for name, kind in columns.items()},
                               strings_can_be_null=False, quoted_strings_can_be_null=False))
    return _typed(table, columns)


def _typed(table: pa.Table, columns: dict[str, str]) -> pd.DataFrame:
    """Arrow -> the frame the rules expect: text as `str`, instants and days as datetime64[ns]."""
    arrays = {}
    for name, kind in columns.items():
        array = table.column(name)
        if kind in ("instant", "day") and not pa.types.is_timestamp(array.type):
            array = array.cast(pa.timestamp("us"))
        elif kind == "float" and not pa.types.is_floating(array.type):
            array = array.cast(pa.float64())
        arrays[name] = array
    # one chunk a column: the ADBC drivers hand over ~1,000-row batches, and pandas' takes and
    # sorts on many-chunked Arrow strings cost a quarter more
    frame = pa.table(arrays).combine_chunks().to_pandas()
    for name, kind in columns.items():
        if kind in ("instant", "day"):
            frame[name] = frame[name].astype("datetime64[ns]")
        elif kind == "text":
            frame[name] = frame[name].fillna("").astype("str")
    return frame


# --------------------------------------------------------------------------------------------
# history for an evaluation


class History:
    """Reads batches of patients' whole history for an evaluation. `open_history(engine)` makes
    one; `load(ids)` returns what `load_patients` returns.

    PostgreSQL: an ADBC connection of its own (autocommit: each query sees what is committed when
    it starts, and no transaction stays open between batches). Reading outside the evaluation's
    write transaction is safe for the same reason reading inside it was (neither is a snapshot of
    the patient index): a load committed after the evaluation took its list of patients and their
    `dirty_seq` moves that sequence on, so `writes.record_evaluation` leaves the patient dirty and
    the next evaluation reads it again.

    SQLite: `load_patients` on a connection of the engine. Not `adbc-driver-sqlite`: it links its
    own copy of SQLite, and two copies in one process break each other's POSIX locks (closing one
    copy's file releases the other's locks: sqlite.org/howtocorrupt.html, 2.2); another process
    then missed what this one had committed (`test_reads`)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._conn = None
        if engine.url.get_backend_name() == "postgresql":
            import adbc_driver_postgresql.dbapi as adbc

            self._conn = adbc.connect(libpq_uri(engine.url), autocommit=True)
            with self._conn.cursor() as cur:
                # the nested loop's large cost estimate would switch JIT compilation on (~0.1 s a batch)
                cur.execute("SET jit = off")
            analytes = ", ".join(f"'{a}'" for a in RULE_ANALYTES)   # constants, not user input
            self._sql = {"labs": _lateral(lab_results.name, LAB_COLUMNS, f"t.analyte IN ({analytes})"),
                         "events": _lateral(clinical_events.name, EVENT_COLUMNS, "true")}

    def load(self, patient_ids: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The whole history (every date) of these patients, as `load_patients` returns it."""
        if self._conn is None:
            with self._engine.connect() as conn:
                return load_patients(conn, patient_ids)
        ids = [str(p) for p in dict.fromkeys(patient_ids)]
        # the ids as a temp table (Arrow in), then queries without parameters, which the driver
        # reads as COPY ... (FORMAT binary): ~20 % faster than passing the ids as a parameter
        with self._conn.cursor() as cur:
            cur.adbc_ingest(_BATCH_TABLE, pa.table({"patient_id": pa.array(ids, type=pa.string())}),
                            mode="replace", temporary=True)
        return self._fetch(self._sql["labs"], LAB_COLUMNS), self._fetch(self._sql["events"], EVENT_COLUMNS)

    def _fetch(self, sql: str, columns: dict[str, str]) -> pd.DataFrame:
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return _typed(cur.fetch_arrow_table(), columns)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lateral(table: str, columns: dict[str, str], where: str) -> str:
    """The batch drives the patient index, one probe a patient (see `_query`)."""
    names = ", ".join(f"t.{c}" for c in columns)
    return (f"SELECT {names} FROM {_BATCH_TABLE} AS b CROSS JOIN LATERAL "
            f"(SELECT * FROM {table} AS t WHERE t.patient_id = b.patient_id AND {where} OFFSET 0) AS t")


def libpq_uri(url: URL) -> str:
    """The libpq URI of a SQLAlchemy PostgreSQL URL (`postgresql+psycopg://...`): the driver name
    dropped; user, password (escaped again), host, port, database and query kept."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def open_history(engine: Engine) -> History:
    """A `History` reader on the engine's store (close it, or use it as a context manager)."""
    return History(engine)


# --------------------------------------------------------------------------------------------
# the evaluation index


def patients_to_evaluate(conn: Connection, as_of: date, digest: str, *, full: bool = False,
                         partition: tuple[int, int] | None = None) -> pd.DataFrame:
    """Patients whose findings as of `as_of` may differ from those of their last evaluation:
    data loaded since (visible by `as_of`), a due date reached, a different rule set, or a night
    replayed before their last one. Columns: patient_id, dirty_seq. `full`: every patient.
    `partition` (i, N): only the patients of partition i of N (`model.partition_of`)."""
    p = patient_index.c
    query = select(p.patient_id, p.dirty_seq)
    if not full:
        query = query.where(to_evaluate(as_of, digest))
    rows = conn.execute(query.order_by(p.patient_id)).all()
    if partition is not None and partition[1] > 1:
        # in Python: SQLite has no SHA-256, and the hash must be the same on both stores
        part, parts = partition
        rows = [r for r in rows if partition_of(r[0], parts) == part]
    return pd.DataFrame({"patient_id": pd.Series([r[0] for r in rows], dtype="str"),
                         "dirty_seq": np.array([r[1] for r in rows], dtype="int64")})
