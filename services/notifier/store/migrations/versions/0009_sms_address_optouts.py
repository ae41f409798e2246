"""sms_address_optouts: an SMS STOP opts the number itself out of marketing SMS

Keyed by a salted hash (HMAC-SHA256 with CLM_PRIVACY_SALT) of the normalized number, never the
number: a customer's erasure leaves nothing of them here, while the STOP stays honoured.

Revision ID: 0009_sms_address_optouts
Revises: 0008_outbox_parked
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_sms_address_optouts"
down_revision = "0008_outbox_parked"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sms_address_optouts",
        sa.Column("phone_hash", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sms_address_optouts")
