"""segment_deletions: segments hidden by a deletion whose memberships are still being removed

Revision ID: 0010_segment_deletions
Revises: 0009_privacy_answer_chunks
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_segment_deletions"
down_revision = "0009_privacy_answer_chunks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_deletions",
        sa.Column("segment_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("segment_deletions")
