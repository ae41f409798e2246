"""privacy_answer_chunks: the chunks of an export part sent in several messages, until all arrived

Revision ID: 0009_privacy_answer_chunks
Revises: 0008_outbox_parked
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009_privacy_answer_chunks"
down_revision = "0008_outbox_parked"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The table as it was at this revision (0012 adds the request parts), not the live model's.
    op.create_table(
        "privacy_answer_chunks",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("service", sa.Text, primary_key=True),
        sa.Column("action", sa.Text, primary_key=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("chunks", sa.Integer, primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True),
        sa.Column("data", JSONB, nullable=False, server_default="{}"),
    )


def downgrade() -> None:
    op.drop_table("privacy_answer_chunks")
