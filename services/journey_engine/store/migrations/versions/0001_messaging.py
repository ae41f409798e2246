"""inbox and outbox

Revision ID: 0001
Revises:
"""

from shared.db import messaging_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    messaging_tables.create_in_migration()


def downgrade() -> None:
    messaging_tables.drop_in_migration()
