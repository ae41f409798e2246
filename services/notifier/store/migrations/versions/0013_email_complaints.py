"""email_address_optouts: a spam complaint opts the email address itself out of marketing email

Keyed by a salted hash (HMAC-SHA256 with CLM_PRIVACY_SALT) of the address in lower case, never the
address, as `sms_address_optouts` keeps SMS STOPs; and contacts found by their email in lower case,
for the customers a complaint opts out.

Revision ID: 0013_email_complaints
Revises: 0012_outbox_packed
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_email_complaints"
down_revision = "0012_outbox_packed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "email_address_optouts",
        sa.Column("address_hash", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute("CREATE INDEX contacts_email_lower ON contacts (lower(email))")


def downgrade() -> None:
    op.execute("DROP INDEX contacts_email_lower")
    op.drop_table("email_address_optouts")
