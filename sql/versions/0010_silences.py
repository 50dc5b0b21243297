"""silences: mute an alert (or a patient's alerts) for a stated time, with a reason (issue 17)

Revision ID: 0010
Revises: 0009

`silences`: one row per silence, never deleted. Its matcher is one alert (`alert_id`) or a
patient (`patient_id`, optionally one `rule`); it holds from `starts_at` to `ends_at`, or until
`ended_at` when unsilenced early. `released_at` records the notify run that queued its alerts
again once it had ended, so an ended silence brings its alerts back exactly once.

"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "silences",
        sa.Column("silence_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.String(length=16),
                  comment="matcher: this alert; NULL for a patient matcher"),
        sa.Column("patient_id", sa.String(length=64),
                  comment="matcher: every alert of this patient (with rule: of that rule)"),
        sa.Column("rule", sa.String(length=40), comment="with patient_id: only this rule; NULL: every rule"),
        sa.Column("starts_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("ends_at", sa.DateTime(), nullable=False, comment="UTC: it expires then"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("ended_at", sa.DateTime(), comment="UTC: unsilenced early"),
        sa.Column("ended_by", sa.String(length=128)),
        sa.Column("released_at", sa.DateTime(),
                  comment="UTC: the notify run that, after its end, queued its still-live alerts again"),
        sa.PrimaryKeyConstraint("silence_id", name=op.f("pk_silences")),
    )
    with op.batch_alter_table("silences") as batch_op:
        batch_op.create_index("ix_silences_ends_at", ["ends_at"], unique=False)
        batch_op.create_index("ix_silences_patient", ["patient_id"], unique=False)
        batch_op.create_index("ix_silences_alert", ["alert_id"], unique=False)


def downgrade() -> None:
    op.drop_table("silences")
