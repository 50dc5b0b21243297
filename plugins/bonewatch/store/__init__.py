"""The store: SQLAlchemy 2 Core tables, the engine, Alembic upgrades and bulk upserts."""
