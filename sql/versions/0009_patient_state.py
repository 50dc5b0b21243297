"""per-patient carried history, so a night reads what changed (issue 16)

Revision ID: 0009
Revises: 0008

`patient_state`: each evaluated patient's history as its last evaluation read it, one Arrow IPC record
batch for its results and one for its events. A night reads that row and the rows collected on
or after the patient's `patient_index.dirty_from` (every load marks the earliest day it touched),
instead of the patient's whole history; see `bonewatch/store/state.py`.

Trigger `lab_results_moved`: a correction that moves a result to another patient (the same result
id, a misidentified specimen) marks the result's *first* owner dirty from the result's day, as a
load marks the patients it touches: that owner's carried copy of it is then not read again. A
trigger, because only the store sees the row's previous owner, and it costs nothing on inserts.
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


    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION bonewatch_mark_moved_result() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO patient_index (patient_id, dirty_from, dirty_seq)
                VALUES (OLD.patient_id, OLD.collected_date, 1)
                ON CONFLICT (patient_id) DO UPDATE SET
                    dirty_from = LEAST(patient_index.dirty_from, excluded.dirty_from),
                    dirty_seq = patient_index.dirty_seq + 1;
                RETURN NULL;
            END $$""")
        op.execute("""
            CREATE TRIGGER lab_results_moved AFTER UPDATE OF patient_id ON lab_results
            FOR EACH ROW WHEN (OLD.patient_id IS DISTINCT FROM NEW.patient_id)
            EXECUTE FUNCTION bonewatch_mark_moved_result()""")
    else:
        op.execute("""
            CREATE TRIGGER lab_results_moved AFTER UPDATE OF patient_id ON lab_results
            WHEN OLD.patient_id IS NOT NEW.patient_id
            BEGIN
                INSERT INTO patient_index (patient_id, dirty_from, dirty_seq)
                VALUES (OLD.patient_id, OLD.collected_date, 1)
                ON CONFLICT (patient_id) DO UPDATE SET
                    dirty_from = CASE WHEN dirty_from IS NULL OR excluded.dirty_from < dirty_from
                                      THEN excluded.dirty_from ELSE dirty_from END,
                    dirty_seq = dirty_seq + 1;
            END""")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS lab_results_moved" +
               (" ON lab_results" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS bonewatch_mark_moved_result()")
    op.drop_table("patient_state")
