"""Engine creation and Alembic upgrades.

Alembic is imported only to migrate: checking that a store is current (every run does it) reads
`alembic_version` with one query and compares it with `HEAD`, the newest revision under `sql/`
(`tests/unit/test_store_head.py` holds the two equal). Importing Alembic and reading its scripts
was ~0.15 s of every run's start, a fifth of a rerun with nothing to do (issue 16).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from bonewatch.errors import StoreError

SQL_DIR = Path(__file__).resolve().parents[3] / "sql"
#: the newest migration under sql/versions (a new migration moves it; a unit test checks it)
HEAD = "0010"


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


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SQL_DIR))
    cfg.set_main_option("path_separator", "os")
    return cfg


def upgrade(engine: Engine) -> str:
    """Create or migrate the store to the newest revision; return that revision."""
    from alembic import command

    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head_revision(engine)


def head_revision(engine: Engine) -> str:
    """The store's revision ("" when it was never migrated)."""
    with engine.connect() as conn:
        if not conn.dialect.has_table(conn, "alembic_version"):
            return ""
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() or ""


def require_current(engine: Engine) -> None:
    """Fail with one line when the store is missing or behind the code."""
    try:
        current = head_revision(engine)
    except Exception as exc:  # unreachable server, bad URL
        raise StoreError(f"cannot open the store ({type(exc).__name__}); check BONEWATCH_DATABASE_URL") from None
    if current != HEAD:
        raise StoreError("the store is not migrated: run `bonewatch db upgrade` first")
