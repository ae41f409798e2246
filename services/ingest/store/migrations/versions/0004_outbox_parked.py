"""outbox_parked: outbox rows too large for Kafka, moved aside by the relay (`shared.db.outbox`)

Revision ID: 0004_outbox_parked
Revises: 0003_privacy
"""

from shared.db import messaging_tables

revision = "0004_outbox_parked"
down_revision = "0003_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    messaging_tables.create_parked_in_migration()


def downgrade() -> None:
    messaging_tables.drop_parked_in_migration()
