"""send ledger: a claim token, so a claim handed back by the stale check cannot be used any more

Revision ID: 0003_claim_token
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_claim_token"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("send_ledger", sa.Column("claim_token", sa.Text))
    # The stale check looks for old claims: a worker's claim that never reached the provider.
    op.create_index(
        "send_ledger_claimed", "send_ledger", ["claimed_at"], postgresql_where=sa.text("state = 'claimed'")
    )


def downgrade() -> None:
    op.drop_index("send_ledger_claimed", table_name="send_ledger")
    op.drop_column("send_ledger", "claim_token")
