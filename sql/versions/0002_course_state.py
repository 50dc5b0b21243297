"""course state for the rule engine: each course's status and renal baseline as of the last evaluation

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "course_states",
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("agent_class", sa.String(16), nullable=False),
        sa.Column("course_start", sa.Date(), nullable=False),
        sa.Column("last_dose", sa.Date(), nullable=False),
        sa.Column("course_end", sa.Date(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="active | held | discontinued"),
        sa.Column("hold_reason", sa.String(64), nullable=False),
        sa.Column("renal_baseline_scr", sa.Float(), nullable=True),
        sa.Column("renal_baseline_date", sa.Date(), nullable=True),
        sa.Column("renal_baseline_crcl", sa.Float(), nullable=True),
        sa.Column("baseline_note", sa.Text(), nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False, comment="the night this state was computed for"),
        sa.PrimaryKeyConstraint("patient_id", "agent_class", "course_start", name=op.f("pk_course_states")),
    )


def downgrade() -> None:
    op.drop_table("course_states")
