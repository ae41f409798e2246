"""customer identities: the time each link was announced, so the newest announcement wins

Revision ID: 0005_identity_linked_at
Revises: 0004_enrolments_customer_index
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_identity_linked_at"
down_revision = "0004_enrolments_customer_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Links made before this revision count as the oldest: any announcement replaces them.
    op.add_column(
        "customer_identities",
        sa.Column(
            "linked_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("'1900-01-01T00:00:00Z'"),
        ),
    )


def downgrade() -> None:
    op.drop_column("customer_identities", "linked_at")
