"""course state for the rule engine (issue: complete clinical rule engine)

Revision ID: 0002
Revises: 0001

Reserved in the migration chain so that parallel work keeps one linear history; it is filled in
by the change that needs it (a no-op until then).
"""

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
