"""the segmenter's recommendation lists per contact (issue 9), for template previews

Revision ID: 0003_recommendations
Revises: 0002
"""

from alembic import op

revision = "0003_recommendations"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE contact_recommendations (customer_id text PRIMARY KEY, lists jsonb NOT NULL, "
        "profile_at timestamptz NOT NULL)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE contact_recommendations")
