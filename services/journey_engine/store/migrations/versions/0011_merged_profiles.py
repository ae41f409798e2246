"""merged_profiles: profiles merged into another, so that what arrives for them later (a membership
or announcement sent before the merge) enters them in nothing, and a merge into one goes on to where
it was merged

Revision ID: 0011_merged_profiles
Revises: 0010_instances_customer
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_merged_profiles"
down_revision = "0010_instances_customer"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "merged_profiles",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("merged_into", sa.Text, nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("merged_profiles")
