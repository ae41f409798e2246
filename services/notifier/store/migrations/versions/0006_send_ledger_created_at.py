"""send ledger: index by creation time, for the message performance report's periods

Revision ID: 0006_send_ledger_created_at
Revises: 0005_customer_identities
"""

from alembic import op

revision = "0006_send_ledger_created_at"
down_revision = "0005_customer_identities"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("send_ledger_created_at", "send_ledger", ["created_at"])


def downgrade() -> None:
    op.drop_index("send_ledger_created_at", table_name="send_ledger")
