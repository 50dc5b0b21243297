"""Named locks between processes that share one store: one night run at a time, one load of a
delivery at a time, one evaluation of the store at a time.

`hold(engine, name, wait_s=..., holder=...)` is a context manager. A second process asking for a
name already held waits up to `wait_s` seconds, then raises `Busy` with one line naming who holds
it (the holder's own description: what it runs, its process id and host, since when; never
patient data). A crash releases the lock with the process, so no lock outlives its holder:

- PostgreSQL: a session advisory lock, `pg_try_advisory_lock(namespace, key)`, on a connection of
  its own that stays open while the lock is held. The holder's description is that connection's
  `application_name`, which `pg_stat_activity` shows to the waiting process (and to a DBA).
- SQLite (one host by construction): an exclusive `flock` on a file beside the database, in
  `<database>.locks/`; the holder writes its description into the file.

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
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bonewatch.errors import Busy

# the first key of every bonewatch advisory lock: keeps ours apart from other applications'
_NAMESPACE = 0x626F6E65 - (1 << 31)   # "bone", as a signed 32-bit integer
_POLL_S = 0.2
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
def hold(engine: Engine, name: str, *, wait_s: float, holder: str | None = None) -> Iterator[None]:
    """Hold lock `name` for the duration of the block; wait at most `wait_s` seconds for it.

    Raises `Busy` ("<name> is held by <holder>; waited N s") when it stays taken. `holder`
    describes this process (default: `describe(name)`).
    """
    holder = holder or describe(name)
    if engine.dialect.name == "postgresql":
        with _advisory(engine, name, wait_s, holder):
            yield
    else:
        with _flock(_lock_file(engine, name), name, wait_s, holder):
            yield


@contextmanager
def _advisory(engine: Engine, name: str, wait_s: float, holder: str) -> Iterator[None]:
    key = key_of(name)
    with engine.connect() as conn:
        conn.execute(text("SELECT set_config('application_name', :holder, false)"), {"holder": holder})
        conn.commit()
        deadline = time.monotonic() + wait_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:ns, :key)"),
                               {"ns": _NAMESPACE, "key": key}).scalar():
            conn.commit()
            if time.monotonic() >= deadline:
                other = conn.execute(text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :ns AND l.objid = :key "
                    "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"),
                    # pg_locks shows the keys as unsigned oids
                    {"ns": _NAMESPACE & 0xFFFFFFFF, "key": key & 0xFFFFFFFF}).scalar()
                raise Busy(name, other or "another process", wait_s)
            time.sleep(_POLL_S)
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:ns, :key)"), {"ns": _NAMESPACE, "key": key})
                conn.commit()
            except Exception:  # noqa: BLE001 - a lost connection released the lock with it
                pass


def _lock_file(engine: Engine, name: str) -> Path:
    database = make_url(str(engine.url)).database
    if database and database != ":memory:":
        folder = Path(database).with_name(Path(database).name + ".locks")
    else:  # an in-memory store lives in one process; the lock still guards its threads
        folder = Path(tempfile.gettempdir()) / f"bonewatch-locks-{os.getpid()}-{id(engine)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (_SAFE.sub("_", name)[:80] + f".{key_of(name) & 0xFFFFFFFF:08x}.lock")


@contextmanager
def _flock(path: Path, name: str, wait_s: float, holder: str) -> Iterator[None]:
    # A file of its own per acquisition attempt: flock excludes open file descriptions, so two
    # threads of one process exclude each other as two processes do.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    try:
                        other = path.read_text(encoding="utf-8", errors="replace").strip()
                    except OSError:
                        other = ""
                    raise Busy(name, other or "another process", wait_s) from None
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8", "replace"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

