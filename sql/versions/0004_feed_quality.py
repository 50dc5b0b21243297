"""per-run, per-feed data-quality metrics (issue: dashboards)

Revision ID: 0004
Revises: 0003

- `dq_arrivals`: when each delivery reached the inbox (the file's modification time, or the
  ingest time), so a feed can be judged on time, late or missing against its deadline.
- `dq_feed_nights`: per night and feed: status, red/amber/green, rows received / accepted /
  quarantined (with reasons stripped of patient data), expectations passed and failed, unit mix and
  unit switches, key-analyte distributions, the problems found.
- `dq_nights`: per night: alerts raised per rule, acknowledgement latency, unreadable files.
- `dq_validations`: the GX validation results of each delivery chunk, for the Data Docs.
- `dq_problems`: problems already reported to the data team (one email per new problem).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dq_arrivals",
        sa.Column("delivery_id", sa.String(length=64), nullable=False, comment="deliveries.delivery_id"),
        sa.Column("arrived_at", sa.DateTime(), nullable=False, comment="UTC: when the file reached the inbox"),
        sa.Column("basis", sa.String(length=16), nullable=False, comment="file_mtime | ingested"),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_dq_arrivals")),
    )
    op.create_table(
        "dq_feed_nights",
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("feed", sa.String(length=64), nullable=False),
        sa.Column("expected", sa.Boolean(), nullable=False),
        sa.Column("deadline_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("arrived_at", sa.DateTime(), nullable=True, comment="UTC: the night's last delivery of the feed"),
        sa.Column("status", sa.String(length=16), nullable=False,
                  comment="on_time | late | missing | pending | not_expected | unreadable"),
        sa.Column("rag", sa.String(length=8), nullable=False, comment="red | amber | green | grey"),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("resent", sa.Integer(), nullable=False, comment="files identical to an earlier delivery"),
        sa.Column("rows_total", sa.Integer(), nullable=False),
        sa.Column("rows_accepted", sa.Integer(), nullable=False),
        sa.Column("rows_quarantined", sa.Integer(), nullable=False),
        sa.Column("bad_row_rate", sa.Float(), nullable=False),
        sa.Column("expectations_passed", sa.Integer(), nullable=False),
        sa.Column("expectations_failed", sa.Integer(), nullable=False),
        sa.Column("quarantine_reasons", sa.Text(), nullable=False,
                  comment="JSON {reason without patient data: rows}"),
        sa.Column("units", sa.Text(), nullable=False, comment="JSON {analyte: {unit as sent: rows}}"),
        sa.Column("unit_switches", sa.Text(), nullable=False, comment="JSON list"),
        sa.Column("distributions", sa.Text(), nullable=False,
                  comment="JSON {analyte: {n, p05..p95, history_p50}}"),
        sa.Column("notes", sa.Text(), nullable=False, comment="JSON list of problems, plain text"),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("night", "feed", name=op.f("pk_dq_feed_nights")),
    )
    op.create_table(
        "dq_nights",
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("alerts_raised", sa.Integer(), nullable=False),
        sa.Column("alerts_by_rule", sa.Text(), nullable=False,
                  comment="JSON {rule: alerts first raised this night}"),
        sa.Column("ack_latency", sa.Text(), nullable=False,
                  comment="JSON, alerts raised in the window, as of the run"),
        sa.Column("unreadable_files", sa.Integer(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("night", name=op.f("pk_dq_nights")),
    )
    op.create_table(
        "dq_validations",
        sa.Column("delivery_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False, comment="chunk number within the delivery"),
        sa.Column("feed", sa.String(length=64), nullable=False),
        sa.Column("night", sa.Date(), nullable=True),
        sa.Column("suite", sa.String(length=64), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("evaluated", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("validated_at", sa.DateTime(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False,
                  comment="GX validation result JSON, unexpected-row lists removed"),
        sa.PrimaryKeyConstraint("delivery_id", "seq", name=op.f("pk_dq_validations")),
    )
    with op.batch_alter_table("dq_validations", schema=None) as batch_op:
        batch_op.create_index("ix_dq_validations_night", ["night"], unique=False)
    op.create_table(
        "dq_problems",
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("feed", sa.String(length=64), nullable=False),
        sa.Column("issue", sa.String(length=64), nullable=False,
                  comment="late | missing | bad_rows | unit_switch:<analyte> | unreadable"),
        sa.Column("severity", sa.String(length=8), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("found_at", sa.DateTime(), nullable=False),
        sa.Column("message_key", sa.String(length=200), nullable=True,
                  comment="outbox key of the data-team email; NULL when not emailed"),
        sa.PrimaryKeyConstraint("night", "feed", "issue", name=op.f("pk_dq_problems")),
    )


def downgrade() -> None:
    op.drop_table("dq_problems")
    with op.batch_alter_table("dq_validations", schema=None) as batch_op:
        batch_op.drop_index("ix_dq_validations_night")
    op.drop_table("dq_validations")
    op.drop_table("dq_nights")
    op.drop_table("dq_feed_nights")
    op.drop_table("dq_arrivals")
