"""privacy: requests and answers (erasure receipts, export parts), erasure tombstones, audit log

Revision ID: 0003_privacy
Revises: 0002
"""

from alembic import op

from services.segmenter.store import privacy
from shared.db import privacy_tables

revision = "0003_privacy"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    privacy_tables.create_in_migration(tombstones=True)
    privacy.privacy_requests.create(bind)
    privacy.privacy_answers.create(bind)


def downgrade() -> None:
    op.drop_table("privacy_answers")
    op.drop_table("privacy_requests")
    privacy_tables.drop_in_migration(tombstones=True)
