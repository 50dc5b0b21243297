"""alert audit and delivery tracking (issue: alerts nurses can trust)

Revision ID: 0003
Revises: 0002

- `alert_audit`: one row per alert state change and per send attempt (when, by whom or by what,
  result). Append-only; it never holds a patient identifier (alert ids are opaque).
- `alerts.last_notified_night`, `alerts.notify_count`: when an alert last reached a recipient and
  how many digests carried it, for the re-notify interval of unacknowledged high-severity alerts.
- `outbox.message_key`, `body_text`, `body_html`: ready-made messages (data-quality notices)
  queued by key, idempotent on (kind, message_key, recipient); `next_attempt_at`: back-off
  after a failed attempt.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_audit",
        sa.Column("audit_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False, comment="UTC, wall clock"),
        sa.Column("night", sa.Date(), nullable=True, comment="the night being processed, if any"),
        sa.Column("alert_id", sa.String(length=16), nullable=True),
        sa.Column("message_id", sa.String(length=128), nullable=True),
        sa.Column("event", sa.String(length=24), nullable=False,
                  comment="raised|reopened|resolved|notified|acknowledged|send|cancelled"),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=True),
        sa.Column("actor", sa.String(length=160), nullable=False, comment="evaluate | outbox | cli:<name> | web:<name>"),
        sa.Column("result", sa.String(length=16), nullable=False, comment="ok | accepted | failed"),
        sa.Column("detail", sa.Text(), nullable=True, comment="recipient, SMTP reply; never patient data"),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_alert_audit")),
    )
    with op.batch_alter_table("alert_audit", schema=None) as batch_op:
        batch_op.create_index("ix_alert_audit_alert", ["alert_id", "at"], unique=False)
        batch_op.create_index("ix_alert_audit_message", ["message_id"], unique=False)

    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_notified_night", sa.Date(), nullable=True,
                                      comment="night of the last digest a server accepted with it"))
        batch_op.add_column(sa.Column("notify_count", sa.Integer(), nullable=False, server_default="0",
                                      comment="digests accepted with it (all recipients)"))

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message_key", sa.String(length=200), nullable=True,
                                      comment="caller's key of a ready-made message"))
        batch_op.add_column(sa.Column("body_text", sa.Text(), nullable=True, comment="ready-made messages only"))
        batch_op.add_column(sa.Column("body_html", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True,
                                      comment="back-off: not retried before this (UTC)"))
        batch_op.create_index("ux_outbox_kind_key_recipient", ["kind", "message_key", "recipient"], unique=True)

    # Alerts notified before this revision: their last digest is as old as their notification.
    alerts = sa.table("alerts", sa.column("alert_id", sa.String), sa.column("notified_at", sa.DateTime),
                      sa.column("last_notified_night", sa.Date), sa.column("notify_count", sa.Integer))
    conn = op.get_bind()
    rows = conn.execute(sa.select(alerts.c.alert_id, alerts.c.notified_at)
                        .where(alerts.c.notified_at.is_not(None))).all()
    if rows:
        conn.execute(
            alerts.update().where(alerts.c.alert_id == sa.bindparam("b_id"))
            .values(last_notified_night=sa.bindparam("b_night"), notify_count=1),
            [{"b_id": r.alert_id, "b_night": r.notified_at.date()} for r in rows])


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ux_outbox_kind_key_recipient")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("body_html")
        batch_op.drop_column("body_text")
        batch_op.drop_column("message_key")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("notify_count")
        batch_op.drop_column("last_notified_night")
    with op.batch_alter_table("alert_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_alert_audit_message")
        batch_op.drop_index("ix_alert_audit_alert")
    op.drop_table("alert_audit")
