"""send ledger: the correlation id of the request, passed on by every status of the message

Revision ID: 0004_correlation_id
Revises: 0003_claim_token, 0003_privacy, 0003_recommendations
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_correlation_id"
down_revision = ("0003_claim_token", "0003_privacy", "0003_recommendations")
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("send_ledger", sa.Column("correlation_id", sa.Text))


def downgrade() -> None:
    op.drop_column("send_ledger", "correlation_id")
