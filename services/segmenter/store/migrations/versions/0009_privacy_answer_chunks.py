"""privacy_answer_chunks: the chunks of an export part sent in several messages, until all arrived

Revision ID: 0009_privacy_answer_chunks
Revises: 0008_outbox_parked
"""

from alembic import op

from services.segmenter.store import privacy

revision = "0009_privacy_answer_chunks"
down_revision = "0008_outbox_parked"
branch_labels = None
depends_on = None


def upgrade() -> None:
    privacy.privacy_answer_chunks.create(op.get_bind())


def downgrade() -> None:
    op.drop_table("privacy_answer_chunks")
