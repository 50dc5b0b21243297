"""external feed sources and high-water marks (issue: real hospital feeds)

Revision ID: 0005
Revises: 0004

Reserved in the migration chain so that parallel work keeps one linear history; it is filled in
by the change that needs it (a no-op until then).
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
