"""alert audit and delivery tracking (issue: alerts nurses can trust)

Revision ID: 0003
Revises: 0002

Reserved in the migration chain so that parallel work keeps one linear history; it is filled in
by the change that needs it (a no-op until then).
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
