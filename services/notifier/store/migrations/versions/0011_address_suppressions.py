"""address_suppressions: addresses a provider said do not exist get no message until removed

Keyed by a salted hash (HMAC-SHA256 with CLM_PRIVACY_SALT) of the address in one form (email lower
case, phone E.164, push token), never the address.

Revision ID: 0011_address_suppressions
Revises: 0010_contacts_phone_e164
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_address_suppressions"
down_revision = "0010_contacts_phone_e164"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "address_suppressions",
        sa.Column("address_hash", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("provider", sa.Text),
        sa.Column("message_id", sa.Text),
        sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("address_suppressions")
