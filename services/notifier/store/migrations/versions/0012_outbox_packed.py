"""outbox: packed rows (a unit of work's messages in one row; `shared.db.outbox`)

Revision ID: 0012_outbox_packed
Revises: 0011_address_suppressions
"""

from shared.db import messaging_tables

revision = "0012_outbox_packed"
down_revision = "0011_address_suppressions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    messaging_tables.pack_outbox_in_migration()


def downgrade() -> None:
    messaging_tables.unpack_outbox_in_migration()
