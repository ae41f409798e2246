"""customer identities: any identifier of a customer resolves to its canonical id

Revision ID: 0005_customer_identities
Revises: 0004_correlation_id
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_customer_identities"
down_revision = "0004_correlation_id"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customer_identities",
        sa.Column("identity", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_customer_identities_customer_id", "customer_identities", ["customer_id"])


def downgrade() -> None:
    op.drop_table("customer_identities")
