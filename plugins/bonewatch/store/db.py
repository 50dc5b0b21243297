"""Engine creation and Alembic upgrades."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from bonewatch.errors import StoreError

SQL_DIR = Path(__file__).resolve().parents[3] / "sql"


def make_engine(url: str) -> Engine:
    """An engine for the store; SQLite gets WAL and a busy timeout so Airflow tasks can share it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SQL_DIR))
    cfg.set_main_option("path_separator", "os")
    return cfg


def upgrade(engine: Engine) -> str:
    """Create or migrate the store to the newest revision; return that revision."""
    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head_revision(engine)


@lru_cache(maxsize=1)
def _head() -> str:
    return ScriptDirectory(str(SQL_DIR)).get_current_head()


def head_revision(engine: Engine) -> str:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() or ""


def require_current(engine: Engine) -> None:
    """Fail with one line when the store is missing or behind the code."""
    try:
        current = head_revision(engine)
    except Exception as exc:  # unreachable server, bad URL
        raise StoreError(f"cannot open the store ({type(exc).__name__}); check BONEWATCH_DATABASE_URL") from None
    if current != _head():
        raise StoreError("the store is not migrated: run `bonewatch db upgrade` first")
