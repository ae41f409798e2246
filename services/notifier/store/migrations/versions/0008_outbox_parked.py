"""outbox_parked: outbox rows too large for Kafka, moved aside by the relay (`shared.db.outbox`)

Revision ID: 0008_outbox_parked
Revises: 0007_customer_aliases
"""

from shared.db import messaging_tables

revision = "0008_outbox_parked"
down_revision = "0007_customer_aliases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    messaging_tables.create_parked_in_migration()


def downgrade() -> None:
    messaging_tables.drop_parked_in_migration()
