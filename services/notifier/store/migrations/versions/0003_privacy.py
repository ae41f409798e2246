"""privacy: erasure tombstones and the admin audit log

Revision ID: 0003_privacy
Revises: 0002
"""

from shared.db import privacy_tables

revision = "0003_privacy"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    privacy_tables.create_in_migration(tombstones=True)


def downgrade() -> None:
    privacy_tables.drop_in_migration(tombstones=True)
