"""per-patient carried history, so a night reads what changed (issue 16)

Revision ID: 0009
Revises: 0008

`patient_state`: each evaluated patient's history as its last evaluation read it, one Arrow IPC record
batch for its results and one for its events. A night reads that row and the rows collected on
or after the patient's `patient_index.dirty_from` (every load marks the earliest day it touched),
instead of the patient's whole history; see `bonewatch/store/state.py`.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_state",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("state_with", sa.String(length=32), nullable=False,
                  comment="rules digest and state format it was written with; another one: whole history is read"),
        sa.Column("labs", sa.LargeBinary(), nullable=False, comment="Arrow IPC record batch: the patient's results"),
        sa.Column("events", sa.LargeBinary(), nullable=False, comment="Arrow IPC record batch: the patient's events"),
        sa.Column("as_of", sa.Date(), nullable=False, comment="the night of the evaluation that wrote it"),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patient_state")),
    )


def downgrade() -> None:
    op.drop_table("patient_state")
