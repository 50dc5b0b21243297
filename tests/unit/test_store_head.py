"""The store's revision check needs no Alembic (issue 16): `store.db.HEAD` must be the newest
revision Alembic finds under sql/, and a store behind it must be refused."""

from __future__ import annotations

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from bonewatch.errors import StoreError
from bonewatch.store import db


def test_head_is_alembics_newest_revision():
    assert db.HEAD == ScriptDirectory(str(db.SQL_DIR)).get_current_head()


def test_a_store_behind_the_code_or_never_migrated_is_refused(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    assert db.head_revision(engine) == ""
    with pytest.raises(StoreError, match="not migrated"):
        db.require_current(engine)
    assert db.upgrade(engine) == db.HEAD
    db.require_current(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    assert db.head_revision(engine) == "0009"
    with pytest.raises(StoreError, match="not migrated"):
        db.require_current(engine)
    engine.dispose()
