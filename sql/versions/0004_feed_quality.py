"""per-run, per-feed data-quality metrics (issue: dashboards)

Revision ID: 0004
Revises: 0003

Reserved in the migration chain so that parallel work keeps one linear history; it is filled in
by the change that needs it (a no-op until then).
"""

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
