"""evaluation index for incremental nights (issue: performance)

Revision ID: 0005
Revises: 0004

`patient_index`: one row per patient. Ingest marks the patients a delivery touched (`dirty_from`,
`dirty_seq`); an evaluation records the night it saw (`evaluated_on`), the rule code and
configuration it ran (`evaluated_with`) and the next night on which the patient's findings can
change without new data (`next_due_on`: reviews, course lapses, monitoring windows). A night then
re-evaluates only dirty or due patients, found through the two indexes, not by scanning results.

Upgrading a store that already holds data marks every known patient dirty from its first day, so
the first evaluation after the upgrade is a full one.

(The file name is the slot this migration reserved in the chain; the revision id is what counts.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_index",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("dirty_from", sa.Date(), nullable=True,
                  comment="earliest day of data loaded since its last evaluation; NULL: none"),
        sa.Column("dirty_seq", sa.Integer(), nullable=False, server_default="0",
                  comment="bumped by every load that marks it; an evaluation clears dirty_from only if unchanged"),
        sa.Column("evaluated_on", sa.Date(), nullable=True, comment="night of its last evaluation"),
        sa.Column("evaluated_with", sa.String(length=16), nullable=True,
                  comment="digest of the rule code and configuration used"),
        sa.Column("next_due_on", sa.Date(), nullable=True,
                  comment="first night after evaluated_on when findings can change without new data"),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patient_index")),
    )
    op.create_index("ix_patient_index_next_due_on", "patient_index", ["next_due_on"])
    op.create_index("ix_patient_index_dirty_from", "patient_index", ["dirty_from"])
    op.execute(
        "INSERT INTO patient_index (patient_id, dirty_from, dirty_seq) "
        "SELECT patient_id, MIN(day), 1 FROM ("
        " SELECT patient_id, collected_date AS day FROM lab_results"
        " UNION ALL SELECT patient_id, occurred_date AS day FROM clinical_events) AS known "
        "GROUP BY patient_id")


def downgrade() -> None:
    op.drop_index("ix_patient_index_dirty_from", table_name="patient_index")
    op.drop_index("ix_patient_index_next_due_on", table_name="patient_index")
    op.drop_table("patient_index")
