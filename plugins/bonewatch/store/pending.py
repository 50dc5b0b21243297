"""What a run has pending, asked of the store before it starts: whether a delivery is in the
ledger already, whether any patient is to be evaluated.

SQLAlchemy only, on purpose: a rerun (every file already loaded, nobody dirty or due) answers both
questions here and stops, without importing pandas, pyarrow, the rules or Great Expectations, which
cost a fresh process more than a second (issue 16). `bonewatch.store.reads.patients_to_evaluate`
reads the same patients, with the same condition, for an evaluation that has work to do.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import ColumnElement, Connection, select

from bonewatch.model import partition_of
from bonewatch.store.tables import deliveries, patient_index


def delivery_status(conn: Connection, delivery_id: str) -> str | None:
    """The ledger's status of a delivery ("loaded", "failed"), None when it has none."""
    return conn.execute(select(deliveries.c.status).where(deliveries.c.delivery_id == delivery_id)).scalar()


def to_evaluate(as_of: date, digest: str) -> ColumnElement[bool]:
    """The patients whose findings as of `as_of` may differ from those of their last evaluation:
    data loaded since (visible by `as_of`), a due date reached, a different rule set (`digest`),
    or a night replayed before their last one."""
    p = patient_index.c
    return ((p.dirty_from <= as_of) | (p.next_due_on <= as_of) | (p.evaluated_on > as_of)
            | p.evaluated_with.is_(None) | (p.evaluated_with != digest))


def anyone_to_evaluate(conn: Connection, as_of: date, digest: str,
                       partition: tuple[int, int] | None = None) -> bool:
    """Whether an incremental evaluation as of `as_of` has any patient to read (of partition i of
    N with `partition`)."""
    query = select(patient_index.c.patient_id).where(to_evaluate(as_of, digest))
    if partition is None or partition[1] == 1:
        return conn.execute(query.limit(1)).first() is not None
    part, parts = partition
    # in Python, as `reads.patients_to_evaluate` does: the hash must be the same on both stores
    return any(partition_of(patient, parts) == part for patient in conn.execute(query).scalars())
