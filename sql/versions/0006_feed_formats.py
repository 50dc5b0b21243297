"""patient references and SQL-source high-water marks (issue: real hospital feeds)

Revision ID: 0006
Revises: 0005

`patient_refs`: FHIR `Patient/<id>` -> MRN, for Observations delivered after their Patient.
`source_watermarks`: per SQL source, the largest watermark already read.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_refs",
        sa.Column("ref", sa.String(length=200), nullable=False, comment="Patient/<resource id>"),
        sa.Column("patient_id", sa.String(length=64), nullable=False,
                  comment="the MRN the Patient resource carried"),
        sa.Column("delivery_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("ref", name=op.f("pk_patient_refs")),
    )
    op.create_table(
        "source_watermarks",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.Text(), nullable=False, comment="the largest watermark read, rendered as text"),
        sa.Column("kind", sa.String(length=16), nullable=False, comment="int | float | datetime | date | text"),
        sa.Column("rows_read", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False, comment="UTC, when the pull committed"),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_source_watermarks")),
    )


def downgrade() -> None:
    op.drop_table("source_watermarks")
    op.drop_table("patient_refs")
