"""The imperative shell that the CLI and the Airflow DAGs call: ingest, evaluate, notify, nightly.

Every function takes `Settings` and an explicit night (`as_of`); none reads the clock for data
logic. Each returns a small summary dataclass whose `as_dict()` is JSON-safe (for XCom).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from sqlalchemy import Engine

from bonewatch import faults, memory
from bonewatch.config import Settings
from bonewatch.errors import BonewatchError, Busy, SourceUnreadable
from bonewatch.ingest.reader import file_digest

log = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    files: int = 0
    skipped_files: int = 0          # already in the delivery ledger (same bytes)
    failed_files: int = 0
    accepted: int = 0
    quarantined: int = 0
    errors: list[str] = field(default_factory=list)   # one line a failed file, no PHI
    not_monitored: int = 0          # results skipped for their code (SPEC 2.5): not bad rows
    #: per file loaded: name, accepted, not_monitored, quarantined (what `bonewatch ingest` prints)
    per_file: list[dict] = field(default_factory=list)
    #: wall time of the loads' parts (`Loaded.seconds`), summed over the files
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __add__(self, other: IngestSummary) -> IngestSummary:
        added = IngestSummary(*(getattr(self, f) + getattr(other, f) for f in
                                ("files", "skipped_files", "failed_files", "accepted", "quarantined", "errors",
                                 "not_monitored", "per_file")))
        added.seconds = _add_seconds(self.seconds, other.seconds)
        return added


def _add_seconds(one: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    return {part: round(one.get(part, 0.0) + other.get(part, 0.0), 3) for part in {**one, **other}}


@dataclass
class EvaluateSummary:
    as_of: str = ""
    patients: int = 0
    findings: int = 0
    new_alerts: int = 0
    resolved_alerts: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    # wall time of each part: reading history, the rules and the calendar, writing the results
    seconds: dict[str, float] = field(default_factory=dict)
    partition: str = ""             # "i/N" for one partition of the patients; "" for all of them

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class NotifySummary:
    queued: int = 0                 # digests put in the outbox this run
    sent: int = 0                   # messages the SMTP server accepted
    failed: int = 0                 # messages left pending: failed now, or waiting out the back-off
    deferred: int = 0               # of those, the ones inside their back-off (not tried this run)
    alerts_notified: int = 0
    cancelled: int = 0              # digests whose alerts were all acknowledged/resolved before sending
    elsewhere: int = 0              # claimed by another run sending at the same time (it sends them)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)



# --------------------------------------------------------------------------------------------
# ingest

FEEDS = {"labs": "lab results (canonical CSV)", "events": "clinical events (CSV)",
         "hl7": "lab results (HL7 v2 ORU^R01)", "fhir": "labs and clinical facts (FHIR R4 Bundle or NDJSON)"}


def _now() -> datetime:
    """Wall-clock time for bookkeeping only (arrival stamps), never for clinical logic."""
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(moment: datetime) -> datetime:
    """Naive UTC, as the store's DateTime columns hold, from an aware or a naive (UTC) time."""
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def walk_paths(paths: Iterable[str | Path], *, inbox: Path | None = None) -> tuple[list[Path], list[SourceUnreadable]]:
    """The files to read, and the paths refused, each with a one-line reason (nothing refused is
    opened): files as given, folders walked recursively (sorted; hidden files ignored).

    Refused: a path that does not exist or is not a regular file (a FIFO would block the reader),
    and a symbolic link that leads out of the folder being walked. A path inside `inbox` (the nightly
    run's loose files and night folder) must also resolve inside `inbox`. A symbolic link named
    explicitly elsewhere is followed: someone typed it. A link to a folder inside the folder walked
    is not followed (its files are walked where they are)."""
    found: list[Path] = []
    refused: list[SourceUnreadable] = []
    fence = _Fence(inbox) if inbox is not None else None
    for raw in paths:
        path = Path(raw)
        if fence is not None and fence.holds(path) and not fence.holds_target(path):
            refused.append(SourceUnreadable(path, None, LEAVES_INBOX))
            continue
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            refused.append(SourceUnreadable(path, None, _os_reason(exc, "no such file or folder")))
            continue
        if stat.S_ISDIR(mode):
            _walk_folder(path, found, refused)
        elif stat.S_ISREG(mode):
            found.append(path)
        else:
            refused.append(SourceUnreadable(path, None, NOT_A_FILE))
    return found, refused


def expand_paths(paths: Iterable[str | Path], *, inbox: Path | None = None) -> list[Path]:
    """The files `walk_paths` reads (what it refuses is left out)."""
    return walk_paths(paths, inbox=inbox)[0]


LEAVES_FOLDER = "a symbolic link leading out of the folder walked: not followed"
LEAVES_INBOX = "a symbolic link leading out of the inbox: not followed"
NOT_A_FILE = "not a regular file"


class _Fence:
    """A folder that paths must not leave (compared on resolved paths: `..`, links)."""

    def __init__(self, folder: Path):
        self.lexical = Path(os.path.abspath(folder))
        self.real = Path(folder).resolve()

    def holds(self, path: Path) -> bool:
        """Is the path (as written, or its resolved folder) inside the fence?"""
        absolute = Path(os.path.abspath(path))
        return (absolute.is_relative_to(self.lexical) or absolute.is_relative_to(self.real)
                or absolute.parent.resolve().is_relative_to(self.real))

    def holds_target(self, path: Path) -> bool:
        """Does the path, every link followed, end inside the fence?"""
        return Path(path).resolve().is_relative_to(self.real)


def _walk_folder(folder: Path, found: list[Path], refused: list[SourceUnreadable]) -> None:
    fence = _Fence(folder)
    here: list[Path] = []

    def failed(exc: OSError) -> None:      # a sub-folder that cannot be listed
        refused.append(SourceUnreadable(exc.filename or folder, None, _os_reason(exc, "cannot be listed")))

    for parent, folders, names in os.walk(folder, onerror=failed):     # links to folders not followed
        for name in folders:
            entry = Path(parent, name)
            if not name.startswith(".") and entry.is_symlink() and not fence.holds_target(entry):
                refused.append(SourceUnreadable(entry, None, LEAVES_FOLDER))
        for name in names:
            if name.startswith("."):
                continue
            entry = Path(parent, name)
            if entry.is_symlink() and not fence.holds_target(entry):
                refused.append(SourceUnreadable(entry, None, LEAVES_FOLDER))
                continue
            try:
                mode = entry.stat().st_mode
            except OSError as exc:        # a broken link, or gone since the folder was listed
                refused.append(SourceUnreadable(entry, None, _os_reason(exc, "no such file")))
                continue
            if stat.S_ISREG(mode):
                here.append(entry)
            else:
                refused.append(SourceUnreadable(entry, None, NOT_A_FILE))
    found.extend(sorted(here))


def _os_reason(exc: OSError, default: str) -> str:
    """An OS error's one-line reason ("Permission denied"), without the path it may quote."""
    return (exc.strerror or default) if isinstance(exc, OSError) else default


#: one engine (one connection pool) per store URL and process: every step of a night used to make
#: its own, and their idle connections piled up until the garbage collector found them (with the
#: locks holding a connection each, PostgreSQL ran out of connection slots). A few URLs are kept,
#: the least recently used disposed.
_ENGINES: OrderedDict[str, Engine] = OrderedDict()
_ENGINES_KEPT = 4


def _forget_engines_after_fork() -> None:
    # a forked child must not use, or close, the parent's connections (closing a PostgreSQL one
    # would end the parent's session): drop them without closing
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def engine_for(settings: Settings, *, migrate: bool = False) -> Engine:
    """The store's engine for this process (made once per URL), checked current, or migrated to
    the newest revision with `migrate`."""
    from bonewatch.store import db

    url = settings.database_url
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = db.make_engine(url)
        while len(_ENGINES) > _ENGINES_KEPT:
            _ENGINES.popitem(last=False)[1].dispose()
    _ENGINES.move_to_end(url)
    if migrate:
        db.upgrade(engine)
    else:
        db.require_current(engine)
    return engine


class _Abort(Exception):
    """The reading side failed: roll the file's transaction back."""


def _load(engine: Engine, settings: Settings, items, ledger: dict,
          finish=None) -> Loaded:
    """Stream one delivery into the store in one transaction: for each `(kind, Chunk)` item of a
    reader (`bonewatch.ingest.sources`), parse it with the canonical parser of its kind, validate
    it with GX, quarantine what cannot be used, bulk-upsert the rest. `ledger` is the delivery's
    ledger row without its counts; `finish(conn)` runs last inside the same transaction (a SQL
    source's high-water mark). Returns the delivery's counts (`Loaded`).

    Two threads: this one reads, parses and validates chunk n + 1 while a writer thread stores
    chunk n (the database's work runs without the GIL: in the PostgreSQL server, or inside
    SQLite's C code). At most one parsed chunk waits between them, so memory stays at about three
    chunks whatever the file's size. Any failure on either side rolls the whole delivery back."""
    import queue
    import threading

    import pandas as pd

    from bonewatch.ingest import feeds
    from bonewatch.quality import suites
    from bonewatch.store import writes

    delivery_id, feed, file_name = ledger["delivery_id"], ledger["feed"], ledger["file_name"]
    received_at = ledger["received_at"]
    plausible = settings.ingest.plausible
    accepted = quarantined = passed = failed = total = 0
    units: dict[str, dict[str, int]] = {}
    codes: list[pd.DataFrame] = []
    work: queue.Queue = queue.Queue(maxsize=1)
    failures: list[BaseException] = []
    # where the time goes (`Loaded.seconds`): this thread reads, parses, validates and waits for
    # the writer; the writer thread writes, at the same time
    seconds = dict.fromkeys(("read", "parse", "validate", "wait", "write"), 0.0)
    clock = time.perf_counter

    def store() -> None:
        marks = writes.PatientMarks()   # patients touched, written once at the end of the delivery
        try:
            with engine.begin() as conn:
                writes.prepare_bulk(conn)
                while True:
                    item = work.get()
                    started = clock()
                    if item is None:
                        raise _Abort
                    if isinstance(item, dict):        # the ledger row: the delivery is complete
                        marks.flush(conn)
                        writes.insert_delivery_codes(conn, _codes_of_delivery(codes, delivery_id, feed))
                        if finish is not None:
                            finish(conn)
                        faults.point("ingest.ledger")
                        writes.record_delivery(conn, item)
                        seconds["write"] += clock() - started   # the commit not included
                        return
                    kind, rows, rejected = item
                    if kind == "labs":
                        writes.upsert_results(conn, rows, marks)
                    elif kind == "events":
                        writes.insert_events(conn, rows, marks)
                    else:
                        writes.upsert_patient_refs(conn, rows)
                    writes.insert_quarantine(conn, rejected)
                    del kind, rows, rejected, item
                    memory.release()     # the chunk's freed pages back to the system (bonewatch.memory)
                    seconds["write"] += clock() - started
        except _Abort:
            pass
        except BaseException as exc:  # handed to the reading side, re-raised there
            failures.append(exc)
            while True:                # unblock the reader until it notices
                try:
                    work.get(timeout=0.1)
                except queue.Empty:
                    if not writer.is_alive() or work.empty():
                        break

    def hand_over(item) -> None:
        started = clock()
        while True:
            if failures:
                raise failures[0]
            try:
                work.put(item, timeout=0.1)
                seconds["wait"] += clock() - started
                return
            except queue.Full:
                continue

    writer = threading.Thread(target=store, name=f"store-{feed}", daemon=True)
    writer.start()
    try:
        started = clock()
        for kind, chunk in items:
            started = _lap(seconds, "read", started)
            total += len(chunk.frame) + len(chunk.bad_rows)
            rows, rejected, skipped = _parse_chunk(settings, kind, chunk, delivery_id, received_at)
            started = _lap(seconds, "parse", started)
            if skipped is not None and len(skipped):
                codes.append(skipped)
            if kind == "codes":
                continue
            if kind in ("labs", "events") and len(rows):
                validation = suites.validate(kind, rows, plausible)
                passed += validation.passed
                failed += validation.failed
                reasons = feeds.implausible(kind, rows, plausible)
                if validation.bad_rows:
                    extra = pd.Series(validation.bad_rows, dtype=object).reindex(rows.index).fillna("")
                    reasons = reasons.where(reasons != "", extra)
                flagged = (reasons != "").to_numpy()
                if flagged.any():
                    columns = feeds.LAB_COLUMNS if kind == "labs" else feeds.EVENT_COLUMNS
                    rejected = pd.concat([rejected, pd.DataFrame({
                        "line": rows.index[flagged].astype("int64"),
                        "reason": reasons[flagged].to_numpy(),
                        "raw": feeds.raw_text(chunk.frame.loc[rows.index[flagged]], columns).to_numpy()})])
                    rows = rows[~flagged]
                started = _lap(seconds, "validate", started)
            if kind == "labs":
                for (analyte, unit), n in rows.groupby(["analyte", "orig_unit"]).size().items():
                    units.setdefault(analyte, {})[unit] = units.get(analyte, {}).get(unit, 0) + int(n)
            quarantine_rows = pd.DataFrame({
                "delivery_id": delivery_id, "source_line": rejected["line"].astype("int64").to_numpy(),
                "feed": feed, "file_name": file_name, "reason": rejected["reason"].to_numpy(),
                "raw": rejected["raw"].to_numpy()})
            started = _lap(seconds, "parse", started)
            hand_over((kind, rows, quarantine_rows))
            faults.point("ingest.chunk")
            if kind != "patients":
                accepted += len(rows)
            quarantined += len(rejected)
            started = clock()
        not_monitored = int(sum(int(c["rows"].sum()) for c in codes))
        hand_over({**ledger, "rows_total": total, "rows_accepted": accepted, "rows_quarantined": quarantined,
                   "rows_not_monitored": not_monitored,
                   "expectations_passed": passed, "expectations_failed": failed,
                   "units": json.dumps(units, sort_keys=True), "status": "loaded", "error": None})
    except BaseException:
        if writer.is_alive() and not failures:
            work.put(None)             # roll back
        writer.join()
        raise
    started = clock()
    writer.join()
    seconds["wait"] += clock() - started
    if failures:
        raise failures[0]
    return Loaded(accepted, quarantined, not_monitored, units, total,
                  {part: round(value, 3) for part, value in seconds.items()})


def _lap(seconds: dict[str, float], part: str, since: float) -> float:
    """Add the time since `since` to `seconds[part]`; return now (the next part's start)."""
    now = time.perf_counter()
    seconds[part] += now - since
    return now


@dataclass
class Loaded:
    """What one delivery brought: rows stored, quarantined, skipped for their code; units as sent."""

    accepted: int
    quarantined: int
    not_monitored: int
    units: dict
    rows_total: int = 0     # everything read, patients' references included
    #: wall time of the load's parts: read (the reader: decoding, CSV, HL7, FHIR), parse (the
    #: canonical parser), validate (GX and the plausible ranges), wait (for the writer thread, its
    #: last chunk and the ledger row included), write (the writer thread's bulk writes, alongside)
    seconds: dict[str, float] = field(default_factory=dict)


#: what `bonewatch ingest` says of a file that gave nothing at all (SPEC 2: never a silent drop)
NOTHING_READ = "nothing bonewatch reads in it (no result, clinical fact or patient)"


def _codes_of_delivery(parts: list, delivery_id: str, feed: str):
    """The chunks' per-code counts of skipped rows -> one `delivery_codes` row per code."""
    import pandas as pd

    if not parts:
        return pd.DataFrame()
    joined = pd.concat(parts)
    out = (joined.groupby("code", sort=True)
           .agg(kind=("kind", "last"), rows=("rows", "sum"), first_collected=("first_collected", "min"),
                last_collected=("last_collected", "max"))
           .reset_index())
    return out.assign(delivery_id=delivery_id, feed=feed)


def _parse_chunk(settings: Settings, kind: str, chunk, delivery_id: str, received_at: datetime):
    """A reader's chunk -> (canonical rows, rejected rows with line, reason, raw)."""
    import pandas as pd

    from bonewatch.ingest import feeds
    from bonewatch.ingest.parsing import NOT_IN_A_REASON

    codes = None
    if kind == "labs":
        parsed = feeds.parse_labs(chunk.frame, settings, delivery_id, received_at)
        rows, rejected, codes = parsed.rows, parsed.rejected, parsed.codes
    elif kind == "events":
        parsed = feeds.parse_events(chunk.frame, settings, delivery_id, received_at)
        rows, rejected = parsed.rows, parsed.rejected
    elif kind == "codes":     # resources of a kind bonewatch reads, with codes it does not follow
        rows, rejected = pd.DataFrame(), pd.DataFrame(columns=["line", "raw", "reason"])
        codes = (chunk.frame.groupby("code").size().rename("rows").reset_index()
                 .assign(kind="not_monitored", first_collected=pd.NaT, last_collected=pd.NaT))
    elif kind == "patients":
        frame = chunk.frame
        reasons = pd.Series("", index=frame.index, dtype=object)
        too_long = ((frame["ref"].str.len() > feeds.REF_MAX) | (frame["patient_id"].str.len() > feeds.PATIENT_ID_MAX)
                    | feeds.has_nul(frame, ["ref", "patient_id"]))
        reasons[too_long.to_numpy(dtype=bool)] = "Patient id or identifier too long or holding a NUL character"
        reasons[((frame["ref"] == "") | (frame["patient_id"] == "")).to_numpy(dtype=bool)] = \
            "Patient without an identifier or id"
        good = reasons == ""
        rows = pd.DataFrame({"ref": frame["ref"][good], "patient_id": frame["patient_id"][good],
                             "delivery_id": delivery_id})
        rejected = pd.DataFrame({"line": frame.index[~good].astype("int64"), "reason": reasons[~good].to_numpy(),
                                 "raw": feeds.raw_text(frame[~good], ["ref", "patient_id"]).to_numpy()})
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")
    if chunk.bad_rows:
        rejected = pd.concat([rejected, pd.DataFrame(chunk.bad_rows, columns=["line", "raw", "reason"])])
    if len(rejected):
        # Reasons quote what was sent (a code, a date, an HL7 field), which may hold a line break
        # (a JSON "\n", an HL7 \X0D\ escape) or a NUL: a quarantine reason is one line, and neither
        # it nor the raw text may hold a NUL (PostgreSQL text cannot).
        rejected = rejected.assign(
            reason=rejected["reason"].astype(str).str.replace(NOT_IN_A_REASON, " ", regex=True),
            raw=rejected["raw"].astype(str).str.replace("\x00", "\ufffd", regex=False))
    return rows, rejected, codes


def _ingest_file(engine: Engine, settings: Settings, path: Path, fmt: str, delivery_id: str,
                 partition: str | None) -> Loaded:
    """Read one file with the reader of its format and load it (`_load`)."""
    from bonewatch.ingest import sources
    from bonewatch.store import writes

    def patient_refs(refs):
        with engine.connect() as conn:
            return writes.lookup_patient_refs(conn, refs)

    received_at = _now()
    ctx = sources.ReadContext(settings, settings.ingest.chunk_size, received_at, patient_refs)
    ledger = {"delivery_id": delivery_id, "feed": sources.FEED_OF_FORMAT[fmt], "file_name": path.name,
              "fmt": sources.FMT_OF_FORMAT[fmt], "partition": partition, "received_at": received_at}
    return _load(engine, settings, sources.read(path, fmt, ctx), ledger)


def _empty_ledger_row(base: dict, delivery_id: str, status: str, error: str | None = None) -> dict:
    """A ledger row with no rows: a file that could not be read, or a pull with nothing new."""
    return {**base, "delivery_id": delivery_id, "rows_total": 0, "rows_accepted": 0, "rows_quarantined": 0,
            "rows_not_monitored": 0,
            "expectations_passed": 0, "expectations_failed": 0, "units": "{}", "status": status, "error": error}


def _file_order(path: Path) -> tuple:
    """Folders load in name order, except that FHIR Patient exports go first: the other resources
    of the same export name their patient by a reference only a Patient resolves."""
    from bonewatch.ingest import sources

    patients_first = 1
    if path.name.lower().endswith(".ndjson") and sources.first_resource_type(path) == "Patient":
        patients_first = 0
    return (str(path.parent), patients_first, path.name)


def ingest(settings: Settings, paths: Iterable[str | Path], *, partition: str | None = None,
           progress: bool = False, feed: str | None = None) -> IngestSummary:
    """Load files or folders into the store; files already in the ledger are skipped.

    Each file is one transaction: its good rows, its quarantined rows (with reasons) and its
    ledger entry land together or not at all. A file that cannot be read (missing, gone or
    unreadable meanwhile, not decodable, a symbolic link out of the folder walked or the inbox:
    `walk_paths`) fails alone, with a one-line error naming it (and the line, where known), recorded
    in the ledger as failed when its bytes can be read; the other files still load. With `feed`,
    only the files of that feed (`sources.FEED_OF_FORMAT`) are loaded: one Airflow task a feed.
    """
    from bonewatch.ingest import sources

    found, refused = walk_paths(paths, inbox=settings.inbox)
    files = sorted(found, key=_file_order)
    engine = engine_for(settings)
    summary = IngestSummary()
    with _progress(progress, "ingest", len(refused) + len(files)) as advance:
        # A refused path is reported by the task of the feed its name gives; one whose name
        # gives none, by the task of the main feed (labs).
        for failure in refused:
            meant = sources.feed_of_name(Path(failure.path).name)
            if feed is None or feed == (meant or "labs"):
                summary.files += 1
                _fail(engine, summary, Path(failure.path), failure, None, partition, read=False,
                      feed=meant)
            advance()
        for path in files:
            try:
                fmt, unreadable = sources.detect_format(path), None
            except FILE_FAULTS as exc:
                fmt, unreadable = None, _unreadable(path, exc)
            meant = sources.FEED_OF_FORMAT[fmt] if fmt else sources.feed_of_name(path.name)
            if feed is not None and (meant or "labs") != feed:
                advance()
                continue
            summary.files += 1
            delivery_id = None
            try:
                if unreadable is not None:
                    raise unreadable
                delivery_id = file_digest(path)
                loaded = _ingest_new(engine, settings, path, fmt, delivery_id, partition)
            except Busy as exc:
                # another process is loading these very bytes and did not finish in lock_wait_s:
                # this file fails alone (reported, not recorded: the other may still load it)
                _fail(engine, summary, path, SourceUnreadable(
                    path, None, f"being loaded by another process ({exc.holder}); run again once it has finished"),
                    None, partition, read=False, feed=meant)
            except FILE_FAULTS as exc:
                _fail(engine, summary, path, _unreadable(path, exc), delivery_id, partition, feed=meant)
            else:
                _count(summary, path, loaded)
            advance()
    return summary


#: what fails one file and not the run: the file's own faults (gone, unreadable, not decodable,
#: oversize framing). A store error is not one of them: it stops the run.
FILE_FAULTS = (SourceUnreadable, OSError, UnicodeError)


def _unreadable(path: Path, exc: BaseException) -> SourceUnreadable:
    """A file's fault as one line naming the file (an OS error without the path it quotes)."""
    if isinstance(exc, SourceUnreadable):
        return exc
    if isinstance(exc, UnicodeError):
        return SourceUnreadable(path, None, "not UTF-8 text")
    return SourceUnreadable(path, None, _os_reason(exc, type(exc).__name__))


def _ingest_new(engine: Engine, settings: Settings, path: Path, fmt: str, delivery_id: str,
                partition: str | None) -> Loaded | None:
    """Load a delivery unless the ledger has it loaded already (then None).

    The ledger check and the load hold one lock per delivery: a second ingest of the same bytes
    at the same time (two processes, a retry beside a slow first try) waits for the first, then
    finds it loaded. Raises `Busy` after `[database] lock_wait_s`. The check imports no data
    stack (`store.pending`): a rerun of files already loaded stops here."""
    from bonewatch.store import locks, pending

    with locks.hold(engine, f"delivery {delivery_id[:16]}", wait_s=settings.database.lock_wait_s,
                    holder=locks.describe(f"ingest {delivery_id[:8]}")):
        with engine.connect() as conn:
            status = pending.delivery_status(conn, delivery_id)
        if status == "loaded":
            return None
        return _ingest_file(engine, settings, path, fmt, delivery_id, partition)


def _count(summary: IngestSummary, path: Path, loaded: Loaded | None) -> None:
    """Add one file's outcome to the summary (None: already in the ledger)."""
    if loaded is None:
        summary.skipped_files += 1
        log.info("skipped %s: already ingested", path.name)
        return
    summary.accepted += loaded.accepted
    summary.quarantined += loaded.quarantined
    summary.not_monitored += loaded.not_monitored
    summary.seconds = _add_seconds(summary.seconds, loaded.seconds)
    summary.per_file.append({"file": path.name, "accepted": loaded.accepted,
                             "not_monitored": loaded.not_monitored, "quarantined": loaded.quarantined,
                             **({"note": NOTHING_READ} if not loaded.rows_total else {})})
    if not loaded.rows_total:
        log.warning("%s: %s", path.name, NOTHING_READ)
    log.info("ingested %s: %d accepted, %d not monitored, %d quarantined", path.name,
             loaded.accepted, loaded.not_monitored, loaded.quarantined)


def _fail(engine: Engine, summary: IngestSummary, path: Path, failure: SourceUnreadable, delivery_id: str | None,
          partition: str | None, *, read: bool = True, feed: str | None = None) -> None:
    """Report a file that failed, and record it in the ledger as failed when its bytes can be
    hashed (`read=False`: never open it, e.g. a link out of the inbox), under `feed` (from its
    format or name; None: the pseudo-feed "unreadable"). A delivery the ledger has as loaded stays
    loaded."""
    from bonewatch.ingest import sources
    from bonewatch.store import pending, writes

    summary.failed_files += 1
    summary.errors.append(str(failure))
    log.warning("%s", failure)
    if delivery_id is None and read:
        try:
            delivery_id = file_digest(path)
        except OSError:
            pass                        # gone or unreadable: reported, not recorded
    if delivery_id is None:
        return
    with engine.begin() as conn:
        if pending.delivery_status(conn, delivery_id) != "loaded":
            writes.record_delivery(conn, _empty_ledger_row(
                {"feed": feed or sources.UNREADABLE_FEED, "file_name": path.name, "fmt": path.suffix.lstrip(".")[:16] or "?",
                 "partition": partition, "received_at": _now()}, delivery_id, "failed", str(failure)[:1000]))


def pull(settings: Settings, names: Iterable[str] | None = None, *, partition: str | None = None,
         progress: bool = False) -> IngestSummary:
    """Pull the new rows of the configured SQL sources (`[sources.*]`), each above its high-water
    mark, in one transaction with the mark. A source that cannot be reached is reported (one line,
    no password) and the others still load; its rows come on the next pull."""
    wanted = list(names) if names is not None else sorted(settings.sources)
    unknown = [name for name in wanted if name not in settings.sources]
    if unknown:
        raise BonewatchError(f"no SQL source named {unknown[0]!r} in the configuration ([sources.*])")
    engine = engine_for(settings)
    summary = IngestSummary()
    with _progress(progress, "pull", len(wanted)) as advance:
        for name in wanted:
            _pull_one(engine, settings, name, partition, summary)
            advance()
    return summary


def _pull_one(engine: Engine, settings: Settings, name: str, partition: str | None, summary: IngestSummary) -> None:
    """One SQL source: read above its mark and add what it loaded to `summary`."""
    import itertools

    from bonewatch.errors import SourceUnavailable
    from bonewatch.ingest import sqlsource
    from bonewatch.store import writes

    source = settings.sources[name]
    summary.files += 1
    with engine.connect() as conn:
        stored = writes.load_watermark(conn, name)
    after = sqlsource.Mark.load(*stored) if stored else None
    state: dict = {}
    base = {"feed": name, "file_name": f"sql:{source.table}"[:512], "fmt": "sql", "partition": partition,
            "received_at": _now()}
    try:
        items = sqlsource.read_sql(name, source, sqlsource.source_engine(name, source), after, state)
        first = next(items, None)
        if first is None:
            if partition is not None:
                with engine.begin() as conn:
                    if not writes.delivered_on_night(conn, name, partition):
                        writes.record_delivery(conn, _empty_ledger_row(
                            base, sqlsource.delivery_id(name, after, partition), "loaded"))
            log.info("pulled %s: nothing new", name)
            return

        def finish(conn) -> None:
            writes.save_watermark(conn, {"source": name, "watermark": state["mark"].text(),
                                         "kind": state["mark"].kind, "rows_read": state["rows"],
                                         "updated_at": _now()})

        ledger = {**base, "delivery_id": sqlsource.delivery_id(name, after)}
        loaded = _load(engine, settings, itertools.chain([first], items), ledger, finish)
        summary.accepted += loaded.accepted
        summary.quarantined += loaded.quarantined
        summary.not_monitored += loaded.not_monitored
        summary.per_file.append({"file": f"sql:{name}", "accepted": loaded.accepted,
                                 "not_monitored": loaded.not_monitored, "quarantined": loaded.quarantined})
        log.info("pulled %s: %d accepted, %d not monitored, %d quarantined", name, loaded.accepted,
                 loaded.not_monitored, loaded.quarantined)
    except SourceUnavailable as exc:
        summary.failed_files += 1
        summary.errors.append(str(exc))
        log.warning("%s", exc)


def partition_paths(settings: Settings, night: date) -> list[Path]:
    """The deliveries of one night: `<inbox>/<YYYY-MM-DD>/` plus loose files in the inbox.

    Every loose entry that is not a folder is offered, a FIFO or a broken link included, so that
    `walk_paths` refuses it by name rather than the night dropping it without a word."""
    inbox = settings.inbox
    if not inbox.is_dir():
        return []
    loose = sorted(p for p in inbox.iterdir() if not p.is_dir() and not p.name.startswith("."))
    folder = inbox / night.isoformat()
    return loose + ([folder] if folder.is_dir() else [])


class _progress:
    """A rich progress bar on a terminal when asked for; a no-op otherwise (Airflow, tests)."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()



# --------------------------------------------------------------------------------------------
# evaluate, notify, nightly


EVALUATE_BATCH_PATIENTS = 2_500   # patients read and evaluated together (bounds memory)


def evaluate(settings: Settings, as_of: date, *, full: bool = False,
             batch_patients: int = EVALUATE_BATCH_PATIENTS,
             partition: tuple[int, int] | None = None) -> EvaluateSummary:
    """Run every rule as of that night and upsert the alerts (idempotent).

    Incremental: only the patients whose findings can have changed since their last evaluation
    are re-evaluated (data loaded since, a due date reached, another rule set, or a night before
    their last one; `bonewatch.incremental`), in batches of `batch_patients`, each with its whole
    history. `full` evaluates every patient. Both give the same alerts. `patients` in the summary
    counts the patients evaluated; `findings` and `by_rule` are theirs.

    `partition` (i, N): only the patients of partition i of N (`model.partition_of`, a stable hash
    of the patient id), so that N processes (Airflow's mapped tasks, on as many workers) evaluate a
    night side by side; it reads, writes and resolves its own patients' alerts, course states and
    index rows only. `finish_evaluation` then runs once, after all N. Without `partition` the
    whole store is evaluated, finishing included.

    Waits for a conflicting evaluation in another process (`[database] lock_wait_s`), then raises
    `Busy`: a whole evaluation or a finishing step excludes every other; partitions of one split
    run together (not two runs of the same partition, nor partitions of splits into different N,
    which share patients).
    """
    from bonewatch.model import MAX_PARTITIONS
    from bonewatch.store import locks

    engine = engine_for(settings)
    wait_s = settings.database.lock_wait_s
    if partition is None:
        # One whole evaluation of the store at a time, whatever the night: two would write the same
        # patients' alerts and course states in interleaved batches (a backfill beside the nightly run).
        with locks.hold(engine, "evaluate", wait_s=wait_s, holder=locks.describe(f"evaluate {as_of}")):
            return _evaluate(engine, settings, as_of, full=full, batch_patients=batch_patients)
    part, parts = partition
    if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts <= MAX_PARTITIONS):
        raise ValueError(f"partition must be (i, N) with 0 <= i < N <= {MAX_PARTITIONS}, got {partition!r}")
    holder = locks.describe(f"evaluate {part}/{parts} {as_of}")
    # "evaluate" shared: the partitions of a split run side by side, a whole evaluation (or the
    # finishing step) waits for all of them; one split at a time (i/4 and j/2 share patients);
    # one run of a partition at a time (two nights of partition i/N write the same patients).
    with (locks.hold(engine, "evaluate", wait_s=wait_s, holder=holder, shared=True),
          locks.hold_group(engine, "evaluate split in", parts, wait_s=wait_s, holder=holder,
                           groups=range(1, MAX_PARTITIONS + 1)),
          locks.hold(engine, f"evaluate {part}/{parts}", wait_s=wait_s, holder=holder)):
        return _evaluate(engine, settings, as_of, full=full, batch_patients=batch_patients, partition=partition)


def finish_evaluation(settings: Settings, as_of: date, *,
                      batch_patients: int = EVALUATE_BATCH_PATIENTS) -> EvaluateSummary:
    """The step that runs once after the N partitions of a night (`evaluate(partition=...)`):
    an unpartitioned incremental evaluation, under the exclusive "evaluate" lock. After every
    partition it finds no patient left, and only the night's global step runs (the open alerts of
    patients not evaluated are seen tonight); a patient still to evaluate (a partition that did
    not run, data loaded meanwhile) is evaluated now and counted in `patients`, with a warning,
    so the night's alerts equal those of one whole evaluation either way."""
    summary = evaluate(settings, as_of, batch_patients=batch_patients)
    if summary.patients:
        log.warning("finishing %s: %d patient(s) were left by the partitions and evaluated now",
                    as_of, summary.patients)
    return summary


def _evaluated_nobody(engine: Engine, as_of: date, partition: tuple[int, int] | None) -> EvaluateSummary:
    """`_evaluate` when no patient is dirty or due: only the open alerts are seen tonight (by
    construction), and the summary is that of an evaluation of nobody."""
    from bonewatch.store import alerts

    with engine.begin() as conn:
        alerts.see_unchanged(conn, as_of, partition=partition)
    label = f"{partition[0]}/{partition[1]}" if partition else ""
    log.info("evaluated %s%s: no patient dirty or due", as_of, f" partition {label}" if label else "")
    return EvaluateSummary(as_of.isoformat(), 0, 0, 0, 0, {}, {"read": 0.0, "rules": 0.0, "write": 0.0}, label)


def _evaluate(engine: Engine, settings: Settings, as_of: date, *, full: bool,
              batch_patients: int, partition: tuple[int, int] | None = None) -> EvaluateSummary:
    from bonewatch import incremental
    from bonewatch.store import alerts, pending

    digest = incremental.rules_digest(settings)
    if not full:
        with engine.connect() as conn:
            anyone = pending.anyone_to_evaluate(conn, as_of, digest, partition)
        if not anyone:      # a rerun: found without importing the data stack or the rules
            return _evaluated_nobody(engine, as_of, partition)
    import pandas as pd

    from bonewatch import rules
    from bonewatch.store import courses, reads, writes
    from bonewatch.store import state as patient_state

    with engine.connect() as conn:
        todo = reads.patients_to_evaluate(conn, as_of, digest, full=full, partition=partition)
    cut = pd.Timestamp(as_of)
    by_rule: dict[str, int] = {}
    found = new = resolved = 0
    seconds = {"read": 0.0, "rules": 0.0, "write": 0.0}
    clock = time.perf_counter

    # One transaction a batch: its alerts, its course states and its index rows land together, so
    # an interrupted evaluation leaves the rest of the patients marked and a rerun completes it.
    # History is read on a connection of its own (`reads.History`: ADBC on PostgreSQL; why that is
    # consistent with the writes of the batch in their own transaction).
    with reads.open_history(engine) as history:
        for start in range(0, len(todo), batch_patients):
            batch = todo.iloc[start:start + batch_patients].copy()
            ids = batch["patient_id"].tolist()
            started = clock()
            # the carried history plus what changed since (store/state.py), or the whole history
            with engine.connect() as conn:
                labs, events, changed = patient_state.load(conn, ids, digest, full=full, whole=history.load)
            started = _lap(seconds, "read", started)
            # the rules see what was collected by the night; the calendar also sees what comes later
            findings, course_states = rules.evaluate_with_state(
                labs[labs["collected_date"] <= cut].reset_index(drop=True),
                reads.visible_events(events, as_of), as_of, settings)
            due = incremental.next_due(labs, events, as_of, settings)
            # (an empty mapping would make pandas cast the dates to float; nothing due is all NaT)
            batch["next_due_on"] = batch["patient_id"].map(due) if len(due) else pd.NaT
            started = _lap(seconds, "rules", started)
            with engine.begin() as conn:
                patient_state.save(conn, labs, events, changed, digest, as_of)
                del labs, events
                added, cleared = alerts.sync_findings(conn, findings, as_of, patients=set(ids))
                courses.save_course_states(conn, course_states, as_of, patients=set(ids))
                writes.record_evaluation(conn, batch, as_of, digest)
            _lap(seconds, "write", started)   # the commit included
            faults.point("evaluate.batch")
            found, new, resolved = found + len(findings), new + added, resolved + cleared
            for f in findings:
                by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
            del findings, course_states, due
            memory.release()         # the batch's freed pages back to the system (bonewatch.memory)
    # The open alerts of the patients not evaluated are found again tonight by construction. A
    # partition sees its own patients' (so that a run evaluating several nights keeps each night's
    # order); the finishing step, everyone's (nothing left after every partition).
    with engine.begin() as conn:
        alerts.see_unchanged(conn, as_of, partition=partition)
    label = f"{partition[0]}/{partition[1]}" if partition else ""
    log.info("evaluated %s%s: %d patients, %d findings, %d new alerts, %d resolved "
             "(read %.1f s, rules %.1f s, write %.1f s)", as_of, f" partition {label}" if label else "",
             len(todo), found, new, resolved, seconds["read"], seconds["rules"], seconds["write"])
    return EvaluateSummary(as_of.isoformat(), len(todo), found, new, resolved, dict(sorted(by_rule.items())),
                           {part: round(value, 3) for part, value in seconds.items()}, label)


def notify(settings: Settings, night: date, *, retry_now: bool = False,
           now: datetime | None = None) -> NotifySummary:
    """Queue tonight's digests (new alerts and due reminders) in the outbox and send whatever the
    outbox holds. `retry_now` ignores the back-off of messages that failed recently. `now` (naive
    UTC, default the clock) decides which silences hold."""
    from bonewatch.notify import outbox

    engine = engine_for(settings)
    queued = outbox.queue_digests(engine, settings, night, silences_at=now)
    result = outbox.flush(engine, settings, retry_now=retry_now, silences_at=now)
    # A deferred message is undelivered too: counting it as failed keeps the exit code (and the
    # Airflow retry) honest.
    summary = NotifySummary(queued=queued, sent=result.sent, failed=result.failed + result.deferred,
                            deferred=result.deferred, alerts_notified=result.alerts_notified,
                            cancelled=result.cancelled, elsewhere=result.elsewhere, errors=list(result.errors))
    log.info("notify %s: %d queued, %d sent, %d failed", night, queued, summary.sent, summary.failed)
    return summary


def nightly(settings: Settings, as_of: date, *, now: datetime | None = None) -> dict:
    """The whole night as the DAGs run it: ingest the night's partition, evaluate, check the
    feeds' data quality, notify. `now` is the run's clock (default: the wall clock); it decides
    whether a feed not there yet is "missing" or "not yet due", and which silences hold."""
    from bonewatch.store import locks

    engine = engine_for(settings)
    # A second run of the same night (a rerun, a retry on another worker) waits for the first,
    # then finds everything done; after `lock_wait_s` it gives up naming the holder.
    with locks.hold(engine, f"night {as_of.isoformat()}", wait_s=settings.database.lock_wait_s,
                    holder=locks.describe(f"nightly {as_of.isoformat()}")):
        return _nightly(engine, settings, as_of, now)


def _nightly(engine: Engine, settings: Settings, as_of: date, now: datetime | None) -> dict:
    from bonewatch.quality import suites
    from bonewatch.store import tables

    started = _now()
    paths = partition_paths(settings, as_of)
    with suites.keep_results() as validations:      # the GX results, for the Data Docs
        ingested = ingest(settings, paths, partition=as_of.isoformat())
        if settings.sources:
            ingested = ingested + pull(settings, partition=as_of.isoformat())
    evaluated = evaluate(settings, as_of)
    checked = quality_check(settings, as_of, now=now or started, paths=paths, validations=validations)
    notified = notify(settings, as_of, now=None if now is None else _naive_utc(now))
    result = {"night": as_of.isoformat(), "ingest": ingested.as_dict(), "evaluate": evaluated.as_dict(),
              "quality": checked.as_dict(), "notify": notified.as_dict()}
    status = "ok" if not (ingested.failed_files or notified.failed) else "failures"
    from bonewatch.store.writes import _insert

    with engine.begin() as conn:
        stmt = _insert(conn, tables.runs)
        stmt = stmt.on_conflict_do_update(index_elements=["run_key"], set_={
            "started_at": stmt.excluded.started_at, "finished_at": stmt.excluded.finished_at,
            "status": stmt.excluded.status, "summary": stmt.excluded.summary})
        conn.execute(stmt, [{"run_key": f"nightly:{as_of.isoformat()}", "kind": "nightly", "night": as_of,
                             "started_at": started, "finished_at": _now(), "status": status,
                             "summary": json.dumps(result, sort_keys=True)}])
    return result


def quality_check(settings: Settings, night: date, *, now: datetime | None = None,
                  paths: Iterable[str | Path] = (), validations: Iterable[dict] = ()):
    """Record the night's data-quality metrics per feed (arrival against the deadline, rows,
    quarantine reasons, expectations, units, key-analyte distributions, alerts per rule,
    acknowledgement latency) and email the data team, never the nurses, about new problems.

    `paths` are the night's inbox files or folders (their modification times are the arrival
    times); `validations` the GX results kept while ingesting them. Returns a QualitySummary.
    """
    from bonewatch.dashboard import record
    from bonewatch.store import locks

    engine = engine_for(settings)
    with locks.hold(engine, f"quality {night.isoformat()}", wait_s=settings.database.lock_wait_s):
        return record.record_night(engine, settings, night, now=now or _now(),
                                   files=expand_paths(paths, inbox=settings.inbox), validations=validations)
