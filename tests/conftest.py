"""Shared fixtures: a clean environment, both stores (SQLite file and the real PostgreSQL), and a
real SMTP server (aiosmtpd) in a thread, after the httpx real-server pattern."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import psycopg
import pytest

from bonewatch.config import load_settings
from bonewatch.notify.catcher import MailCatcher
from bonewatch.store import db

PG_ADMIN = os.environ.get("BONEWATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No BONEWATCH_* from the caller's shell leaks in; every test gets its own data folder."""
    for name in list(os.environ):
        if name.startswith("BONEWATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    yield


@contextmanager
def throwaway_pg_database(prefix: str):
    """Create a PostgreSQL database, yield its URL, drop it.

    PostgreSQL is part of the test contract: when it cannot be reached this fails, never skips.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required by the tests and unreachable: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_database():
    """A throwaway PostgreSQL database for this test session (and xdist worker)."""
    with throwaway_pg_database("bonewatch_test") as url:
        yield url


def _reset_pg(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The store URL, once for a SQLite file and once for the real PostgreSQL (emptied first)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def settings(db_url, monkeypatch):
    """Settings pointing at this test's store; the environment carries the URL for CLI runs."""
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", db_url)
    return load_settings()


@pytest.fixture
def engine(settings):
    """A migrated store (Alembic upgrade head)."""
    eng = db.make_engine(settings.database_url)
    db.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def smtp_server():
    """One real SMTP server (aiosmtpd) for the session, on a free localhost port."""
    with MailCatcher() as catcher:
        yield catcher


@pytest.fixture
def mailbox(smtp_server, monkeypatch):
    """The session SMTP server, emptied, with the BONEWATCH_SMTP_* environment pointing at it."""
    smtp_server.clear()
    smtp_server.refuse()
    monkeypatch.setenv("BONEWATCH_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BONEWATCH_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("BONEWATCH_SMTP_STARTTLS", "false")
    return smtp_server


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (Debian's, networking features off). Playwright's
    sync API keeps an event loop running on this thread while it lives: a test that needs
    `asyncio.run` runs it in a thread of its own."""
    from playwright.sync_api import sync_playwright

    from tests.integration.dq_feeds import launch_chromium

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()
