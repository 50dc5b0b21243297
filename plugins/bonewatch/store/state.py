"""Carried history: a night reads what changed, not every patient's whole history (issue 16).

After each evaluation, the history the rules were given for each patient (the rule analytes'
results and every event, all dates) is kept in `patient_state`, one Arrow IPC record batch per table
per patient. Every load marks the patients it touches with the earliest day of its rows
(`patient_index.dirty_from`, cleared by the evaluation only if no load marked the patient
meanwhile). So the store's rows of a patient dated before its `dirty_from` are exactly the carried
rows dated before it, and a night reads

    carried rows dated before dirty_from  +  the store's rows dated on or after it

one state row a patient and, on an ordinary night, only the night's new rows. A patient woken by a
due date with nothing loaded since keeps its state as it is. A late result or a
correction only moves `dirty_from` back to its day: the window read grows, the carried rows stay
good. (A correction that moves a result to another day replaces the carried copy by result id;
one that moves it to another patient marks its first owner from its day, through the store's
trigger `lab_results_moved`, migration 0009.)
The whole history is read when the carried state cannot be trusted: no state yet, a state written
with another rule digest or state format, a timeless fact changed (birth date, sex: their loads
mark the patient from 1900), or a full evaluation.

The rules are unchanged: they see the same frames as with a whole-history read, row for row (the
order of rows never matters to them); `tests/integration/test_state_equality.py` holds the nights
built this way equal to full evaluations and to replays from scratch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import date, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, bindparam, select

from bonewatch.store import reads
from bonewatch.store.tables import clinical_events, lab_results, patient_index, patient_state
from bonewatch.store.writes import _insert

log = logging.getLogger(__name__)

#: the Arrow types of the carried columns (reads' column kinds)
_ARROW = {"text": pa.string(), "float": pa.float64(), "instant": pa.timestamp("us"), "day": pa.timestamp("us")}
#: a window starting this early is the whole history (timeless facts mark from 1900-01-01)
_WHOLE = pd.Timestamp("1900-01-02")
#: at most this many distinct window starts a batch: patients are grouped, each group read from
#: its earliest start (reading from earlier than needed is always right, only slower)
_GROUPS = 8


def _schema(columns: dict[str, str]) -> pa.Schema:
    return pa.schema([(name, _ARROW[kind]) for name, kind in columns.items()])


LAB_SCHEMA = _schema(reads.LAB_COLUMNS)
EVENT_SCHEMA = _schema(reads.EVENT_COLUMNS)
#: what a state row must have been written with to be read back: the carried columns and analytes
FORMAT = hashlib.sha256(repr((sorted(reads.LAB_COLUMNS.items()), sorted(reads.EVENT_COLUMNS.items()),
                              sorted(reads.RULE_ANALYTES), 2)).encode()).hexdigest()[:8]


def state_key(digest: str) -> str:
    return f"{digest}:{FORMAT}"


def load(conn: Connection, patient_ids: Sequence[str], digest: str, *, full: bool = False,
         whole: Callable[[list[str]], tuple[pd.DataFrame, pd.DataFrame]] | None = None,
         ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The whole history of these patients, as `reads.load_patients` returns it, built from their
    carried state and the rows dated on or after their `dirty_from`; the patients without a usable
    state (or all, `full`) read from the store, through `whole` when given (the evaluation's
    `reads.History.load`: ADBC on PostgreSQL), else `reads.load_patients` on `conn`. Also returns
    the patients whose state must be written again (`save`): all but those carried with nothing
    loaded since."""
    ids = [str(p) for p in dict.fromkeys(patient_ids)]
    carried = {} if full else _carried(conn, ids, state_key(digest))
    read_whole = [p for p in ids if p not in carried]
    whole_history = whole or (lambda some: reads.load_patients(conn, some))
    parts_labs, parts_events = [], []
    if read_whole:
        labs, events = whole_history(read_whole)
        parts_labs.append(labs)
        parts_events.append(events)
    if carried:
        labs, events = _from_state(conn, carried)
        parts_labs.append(labs)
        parts_events.append(events)
    log.debug("history of %d patients: %d carried, %d read whole", len(ids), len(carried), len(read_whole))
    changed = [p for p in ids if p not in carried or not pd.isna(carried[p][2])]
    if len(parts_labs) == 1:
        return parts_labs[0], parts_events[0], changed
    return pd.concat(parts_labs, ignore_index=True), pd.concat(parts_events, ignore_index=True), changed


def _carried(conn: Connection, ids: list[str], key: str) -> dict[str, tuple[bytes, bytes, pd.Timestamp]]:
    """patient -> (labs stream, events stream, window start: NaT when nothing was loaded since)."""
    if not ids:
        return {}
    s, p = patient_state.c, patient_index.c
    query = (select(s.patient_id, s.labs, s.events, p.dirty_from)
             .join(patient_index, p.patient_id == s.patient_id)
             .where(s.patient_id.in_(bindparam("ids", expanding=True)), s.state_with == key))
    out = {}
    for chunk in range(0, len(ids), 10_000):
        for pid, labs, events, since in conn.execute(query, {"ids": ids[chunk:chunk + 10_000]}):
            start = pd.Timestamp(since) if since is not None else pd.NaT
            if pd.isna(start) or start >= _WHOLE:
                out[pid] = (bytes(labs), bytes(events), start)
    return out


def _batches(blobs: list[bytes], schema: pa.Schema) -> pa.Table:
    """Each blob is one Arrow IPC record batch message of `schema` (the schema is not repeated)."""
    return pa.Table.from_batches([pa.ipc.read_record_batch(pa.py_buffer(b), schema) for b in blobs], schema=schema)


def _from_state(conn: Connection, carried: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    labs = _typed(_batches([v[0] for v in carried.values()], LAB_SCHEMA), reads.LAB_COLUMNS)
    events = _typed(_batches([v[1] for v in carried.values()], EVENT_SCHEMA), reads.EVENT_COLUMNS)
    since = pd.Series({pid: v[2] for pid, v in carried.items()}, dtype="datetime64[ns]")
    dirty = since.dropna()
    if dirty.empty:
        return labs, events
    # carried rows dated before the window, the store's rows from it on
    lab_start = labs["patient_id"].map(dirty)
    event_start = events["patient_id"].map(dirty)
    labs = labs[lab_start.isna() | (labs["collected_date"] < lab_start)]
    events = events[event_start.isna() | (events["occurred_date"] < event_start)]
    fresh_labs, fresh_events = _window(conn, dirty)
    # a correction may have moved a result to a day inside the window: the store holds one row an id
    labs = labs[~labs["result_id"].isin(fresh_labs["result_id"])]
    # each patient's rows together again, as a store read returns them (the rules' sorts are cheaper)
    return (pd.concat([labs, fresh_labs]).sort_values("patient_id", kind="stable", ignore_index=True),
            pd.concat([events, fresh_events]).sort_values("patient_id", kind="stable", ignore_index=True))


def _window(conn: Connection, since: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The store's rows of these patients dated on or after their window start (`since`: patient
    -> day), read in a few groups of patients from the group's earliest start."""
    starts = since.sort_values(kind="stable")
    distinct = np.unique(starts.to_numpy())
    if len(distinct) > _GROUPS:      # group the starts: each group read from its first
        edges = distinct[np.linspace(0, len(distinct) - 1, _GROUPS).astype(int)]
        starts = pd.Series(edges[np.searchsorted(edges, starts.to_numpy(), side="right") - 1], index=starts.index)
    lab_parts, event_parts = [], []
    lab, event = lab_results.c, clinical_events.c
    lab_query = (select(*[lab[c] for c in reads.LAB_COLUMNS])
                 .where(lab.patient_id.in_(bindparam("ids", expanding=True)),
                        lab.analyte.in_(reads.RULE_ANALYTES), lab.collected_date >= bindparam("since")))
    event_query = (select(*[event[c] for c in reads.EVENT_COLUMNS])
                   .where(event.patient_id.in_(bindparam("ids", expanding=True)),
                          event.occurred_date >= bindparam("since")))
    for start, group in starts.groupby(starts, sort=True):
        ids = group.index.tolist()
        day = pd.Timestamp(start).date()
        for chunk in range(0, len(ids), 10_000):
            params = {"ids": ids[chunk:chunk + 10_000], "since": day}
            lab_parts.append(conn.execute(lab_query, params).all())
            event_parts.append(conn.execute(event_query, params).all())
    return _rows(lab_parts, reads.LAB_COLUMNS), _rows(event_parts, reads.EVENT_COLUMNS)


def _rows(parts: list[list], columns: dict[str, str]) -> pd.DataFrame:
    rows = [r for part in parts for r in part]
    values = list(zip(*rows, strict=True)) if rows else [[] for _ in columns]
    arrays = {name: _temporal(column) if kind in ("instant", "day") else pa.array(column, type=_ARROW[kind])
              for (name, kind), column in zip(columns.items(), values, strict=True)}
    return _typed(pa.table(arrays), columns)


def _temporal(column: Sequence) -> pa.Array:
    """Days and instants as the driver returns them (dates, datetimes, or ISO text) -> Arrow
    timestamps, converted in C a column at a time (not a pandas Timestamp a value)."""
    sample = next((v for v in column if v is not None), None)
    if isinstance(sample, str):
        return pa.array(column, type=pa.string()).cast(pa.timestamp("us"))
    if isinstance(sample, date) and not isinstance(sample, datetime):
        return pa.array(column, type=pa.date32()).cast(pa.timestamp("us"))
    return pa.array(column, type=pa.timestamp("us"))


def _typed(table: pa.Table, columns: dict[str, str]) -> pd.DataFrame:
    """Arrow -> the frame `reads.load_patients` returns: text as `str`, instants and days as
    datetime64[ns]."""
    frame = table.to_pandas()
    for name, kind in columns.items():
        if kind in ("instant", "day"):
            frame[name] = frame[name].astype("datetime64[ns]")
        elif kind == "text":
            frame[name] = frame[name].fillna("").astype("str")
        else:
            frame[name] = frame[name].astype("float64")
    return frame


def save(conn: Connection, labs: pd.DataFrame, events: pd.DataFrame, patient_ids: Sequence[str], digest: str,
         as_of: date) -> None:
    """Carry these patients' history (as read for this evaluation) to their next evaluation."""
    ids = [str(p) for p in dict.fromkeys(patient_ids)]
    if not ids:
        return
    lab_streams = _streams(labs, reads.LAB_COLUMNS, LAB_SCHEMA, ids)
    event_streams = _streams(events, reads.EVENT_COLUMNS, EVENT_SCHEMA, ids)
    key = state_key(digest)
    rows = [{"patient_id": pid, "state_with": key, "labs": lab_streams[pid], "events": event_streams[pid],
             "as_of": as_of} for pid in ids]
    stmt = _insert(conn, patient_state)
    stmt = stmt.on_conflict_do_update(index_elements=["patient_id"], set_={
        "state_with": stmt.excluded.state_with, "labs": stmt.excluded.labs, "events": stmt.excluded.events,
        "as_of": stmt.excluded.as_of})
    for chunk in range(0, len(rows), 5_000):
        conn.execute(stmt, rows[chunk:chunk + 5_000])


def _streams(frame: pd.DataFrame, columns: dict[str, str], schema: pa.Schema, ids: list[str]) -> dict[str, bytes]:
    """patient -> its rows as one Arrow IPC record batch message (an empty batch when it has none)."""
    table = pa.Table.from_pandas(frame[list(columns)].reset_index(drop=True), schema=schema, preserve_index=False)
    table = table.sort_by("patient_id").combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=schema)
    counts = pc.value_counts(table.column("patient_id")) if table.num_rows else None
    span = {}
    if counts is not None:
        sizes = np.asarray(counts.field("counts"), dtype="int64")
        span = dict(zip(counts.field("values").to_pylist(), zip((np.cumsum(sizes) - sizes).tolist(), sizes.tolist(),
                                                                 strict=True), strict=True))
    return {pid: batch.slice(*span.get(pid, (0, 0))).serialize().to_pybytes() for pid in ids}
