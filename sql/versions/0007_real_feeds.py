"""codes bonewatch does not monitor, and where a result's time came from (issue: real feeds)

Revision ID: 0007
Revises: 0006

`delivery_codes`: per delivery and code, the rows not monitored (a LOINC outside the monitored
set), unmapped (a local code missing from the hospital's map) or ignored (`[ingest] ignore_codes`).
`deliveries.rows_not_monitored` and `dq_feed_nights.rows_not_monitored`: their total, so the
bad-row rate counts only real bad rows.
`lab_results.collected_basis`: "" when a result carried its own collection time, else where it
came from (a FHIR Observation without effective[x]: its DiagnosticReport's, or `issued`).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_codes",
        sa.Column("delivery_id", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False,
                  comment="the code as sent (a valid LOINC, or a local code)"),
        sa.Column("kind", sa.String(length=16), nullable=False,
                  comment="not_monitored (LOINC) | unmapped (local) | ignored"),
        sa.Column("feed", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("first_collected", sa.Date(), comment="earliest collection day among its rows, when one parsed"),
        sa.Column("last_collected", sa.Date()),
        sa.PrimaryKeyConstraint("delivery_id", "code", name=op.f("pk_delivery_codes")),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column(
            "rows_not_monitored", sa.Integer(), nullable=False, server_default="0",
            comment="valid codes of analytes bonewatch does not monitor, and unmapped or ignored local codes"))
    with op.batch_alter_table("dq_feed_nights") as batch:
        batch.add_column(sa.Column(
            "rows_not_monitored", sa.Integer(), nullable=False, server_default="0",
            comment="skipped for their code (not monitored, unmapped, ignored): not in the bad-row rate"))
    with op.batch_alter_table("lab_results") as batch:
        batch.add_column(sa.Column(
            "collected_basis", sa.String(length=32), nullable=False, server_default="",
            comment="'' the result's own time; else where collected_at came from (FHIR DiagnosticReport, issued)"))


def downgrade() -> None:
    with op.batch_alter_table("lab_results") as batch:
        batch.drop_column("collected_basis")
    with op.batch_alter_table("dq_feed_nights") as batch:
        batch.drop_column("rows_not_monitored")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("rows_not_monitored")
    op.drop_table("delivery_codes")
