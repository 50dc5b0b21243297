"""The Alembic migrations and `store/tables.py` describe the same schema: the migrations are
written by hand, and this keeps them from drifting apart (on SQLite and on PostgreSQL)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, MetaData, String

from bonewatch.store.tables import metadata


def _diff(engine, target: MetaData) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, target)


def test_migrated_store_matches_the_table_definitions(engine):
    assert _diff(engine, metadata) == []


def test_a_column_missing_from_the_migrations_is_caught(engine):
    drifted = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["patient_refs"].append_column(Column("added_in_code_only", String(8)))
    (change,) = _diff(engine, drifted)
    assert change[0] == "add_column" and change[3].name == "added_in_code_only"
