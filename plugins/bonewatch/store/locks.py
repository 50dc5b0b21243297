"""Named locks between processes that share one store: one night run at a time, one load of a
delivery at a time, one evaluation of the store (or of one patient partition) at a time.

`hold(engine, name, wait_s=..., holder=..., shared=False)` is a context manager. A second process
asking for a name already held waits up to `wait_s` seconds, then raises `Busy` with one line
naming who holds it (the holder's own description: what it runs, its process id and host, since
when; never patient data). `shared=True` holds the name alongside other shared holders and
excludes only an exclusive one (the partitions of an evaluation share "evaluate", which a whole
evaluation holds exclusively). `hold_group(engine, name, group, ...)` lets any number of holders
of one group in at once, never two groups (partitions of one split, never of two different
splits, whose patients overlap). A crash releases the lock with the process, so no lock outlives
its holder:

- PostgreSQL: a session advisory lock, `pg_try_advisory_lock[_shared](namespace, key)`, on a
  connection of its own that stays open while the lock is held. The holder's description is that
  connection's `application_name`, which `pg_stat_activity` shows to the waiting process (and to a
  DBA).
- SQLite (one host by construction): a `flock` (exclusive or shared) on a file beside the
  database, in `<database>.locks/`; an exclusive holder writes its description into the file, a
  shared one into a `.holder` file of its own beside it.

Locks serialise writers that would otherwise interleave (two loads of one file, two evaluations
writing the same alerts); the outbox's per-message claim (`notify.outbox`) does not need one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bonewatch.errors import Busy

# the first key of every bonewatch advisory lock: keeps ours apart from other applications'
_NAMESPACE = 0x626F6E65 - (1 << 31)   # "bone", as a signed 32-bit integer
_POLL_S = 0.2
_GATE_WAIT_S = 30.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def describe(what: str) -> str:
    """A holder's description: what it runs, process id, host and start time (UTC), at most 63
    characters (PostgreSQL's limit for `application_name`)."""
    host = socket.gethostname().split(".")[0][:16]
    since = datetime.now(UTC).strftime("%H:%M:%S")
    return f"bonewatch {what[:24]} pid {os.getpid()}@{host} {since}Z"[:63]


def key_of(name: str) -> int:
    """A lock name as the signed 32-bit second key of its advisory lock."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


@contextmanager
def hold(engine: Engine, name: str, *, wait_s: float, holder: str | None = None,
         shared: bool = False) -> Iterator[None]:
    """Hold lock `name` for the duration of the block; wait at most `wait_s` seconds for it.

    Raises `Busy` ("<name> is held by <holder>; waited N s") when it stays taken. `holder`
    describes this process (default: `describe(name)`). `shared`: held together with any other
    shared holder; only an exclusive holder excludes it (and it excludes an exclusive one).
    """
    holder = holder or describe(name)
    if engine.dialect.name == "postgresql":
        with _advisory(engine, name, wait_s, holder, shared):
            yield
    else:
        with _flock(_lock_file(engine, name), name, wait_s, holder, shared):
            yield


@contextmanager
def hold_group(engine: Engine, name: str, group: int, *, wait_s: float, holder: str | None = None,
               groups: range = range(1, 1025)) -> Iterator[None]:
    """Hold `name` for `group` (one of `groups`): any number of holders of the same group at once,
    never two different groups. Waits at most `wait_s` seconds for the other group to finish,
    then raises `Busy` naming one of its holders.

    A gate (`name` + " gate", held for a moment) makes checking the other groups and joining one's
    own one step; joining is a shared hold of `name` + " <group>", so a crash leaves the group too.
    """
    holder = holder or describe(name)
    deadline = time.monotonic() + wait_s
    with ExitStack() as stack:
        while True:
            # the gate is held for a moment by whoever is joining a group: waiting for it is not
            # waiting for a holder, so even `wait_s=0` waits a little for it
            with hold(engine, f"{name} gate", wait_s=max(_GATE_WAIT_S, deadline - time.monotonic()),
                      holder=holder):
                other = _held(engine, [f"{name} {g}" for g in groups if g != group])
                if other is None:
                    # only a probe under this gate takes "<name> <group>" exclusively: no wait
                    stack.enter_context(hold(engine, f"{name} {group}", wait_s=0, holder=holder, shared=True))
                    break
            if time.monotonic() >= deadline:
                raise Busy(f"{name} {group}", other, wait_s)   # held by another group's holder
            time.sleep(_POLL_S)
        yield


def _held(engine: Engine, names: list[str]) -> str | None:
    """The description of a holder of any of `names` (exclusive or shared), or None if none is held.
    Only meaningful while nobody can take them meanwhile (under `hold_group`'s gate)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT coalesce(a.application_name, '') FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :ns "
                "AND l.objid::bigint = ANY(CAST(:keys AS bigint[])) AND l.objsubid = 2 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1"),
                {"ns": _NAMESPACE & 0xFFFFFFFF, "keys": [key_of(n) & 0xFFFFFFFF for n in names]}).first()
            conn.rollback()
        return None if row is None else (row[0] or "another process")
    for name in names:
        path = _lock_file(engine, name, create=False)
        if not path.exists():       # made at the first hold: never held
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder_of(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return None


@contextmanager
def _advisory(engine: Engine, name: str, wait_s: float, holder: str, shared: bool) -> Iterator[None]:
    key = key_of(name)
    suffix = "_shared" if shared else ""
    with engine.connect() as conn:
        conn.execute(text("SELECT set_config('application_name', :holder, false)"), {"holder": holder})
        conn.commit()
        deadline = time.monotonic() + wait_s
        while not conn.execute(text(f"SELECT pg_try_advisory_lock{suffix}(:ns, :key)"),
                               {"ns": _NAMESPACE, "key": key}).scalar():
            conn.commit()
            if time.monotonic() >= deadline:
                # (a shared waiter is blocked by the exclusive holder; an exclusive one by any)
                other = conn.execute(text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :ns AND l.objid = :key "
                    "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database()) "
                    "ORDER BY l.mode = 'ExclusiveLock' DESC LIMIT 1"),
                    # pg_locks shows the keys as unsigned oids
                    {"ns": _NAMESPACE & 0xFFFFFFFF, "key": key & 0xFFFFFFFF}).scalar()
                raise Busy(name, other or "another process", wait_s)
            time.sleep(_POLL_S)
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(text(f"SELECT pg_advisory_unlock{suffix}(:ns, :key)"), {"ns": _NAMESPACE, "key": key})
                conn.commit()
            except Exception:  # noqa: BLE001 - a lost connection released the lock with it
                pass


def _lock_file(engine: Engine, name: str, *, create: bool = True) -> Path:
    database = make_url(str(engine.url)).database
    if database and database != ":memory:":
        folder = Path(database).with_name(Path(database).name + ".locks")
    else:  # an in-memory store lives in one process; the lock still guards its threads
        folder = Path(tempfile.gettempdir()) / f"bonewatch-locks-{os.getpid()}-{id(engine)}"
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / (_SAFE.sub("_", name)[:80] + f".{key_of(name) & 0xFFFFFFFF:08x}.lock")


def _holder_of(path: Path) -> str:
    """Who holds a lock file: the exclusive holder's description in the file, else a shared
    holder's in one of its `.holder` files, else "another process"."""
    candidates = [path, *sorted(path.parent.glob(path.name + ".*.holder"))]
    for candidate in candidates:
        try:
            other = candidate.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if other:
            return other
    return "another process"


@contextmanager
def _flock(path: Path, name: str, wait_s: float, holder: str, shared: bool) -> Iterator[None]:
    # A file of its own per acquisition attempt: flock excludes open file descriptions, so two
    # threads of one process exclude each other as two processes do.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    mine = path.with_name(f"{path.name}.{os.getpid()}-{fd}.holder")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy(name, _holder_of(path), wait_s) from None
                time.sleep(_POLL_S)
        if shared:
            # several shared holders at once: each describes itself in a file of its own
            mine.write_text(holder, encoding="utf-8")
        else:
            # no shared holder is left: a `.holder` file here is a crashed one's
            for stale in path.parent.glob(path.name + ".*.holder"):
                stale.unlink(missing_ok=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode("utf-8", "replace"), 0)
        try:
            yield
        finally:
            if shared:
                mine.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

