"""an outbox message is claimed before it is sent (issue: exactly once under faults)

Revision ID: 0008
Revises: 0007

`outbox.claimed_by` / `outbox.claimed_until`: the flush that is sending the message, and until
when its claim holds. A flush claims a pending message with one conditional UPDATE (pending and
not claimed, or claimed by a flush whose lease has run out) before it talks to the SMTP server,
so two flushes at once never send one message twice; a flush that died holding a claim lets
another take the message over once the lease has expired.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(length=64),
                                   comment="the flush sending it: process and host"))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(),
                                   comment="the claim holds until then (UTC); expired: any flush may take it"))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
