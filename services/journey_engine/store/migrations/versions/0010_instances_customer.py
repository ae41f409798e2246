"""instances(customer_id) for instances of any status: a merge moves the merged-away profile's
finished instances too, which the partial (active-only) indexes do not reach

Revision ID: 0010_instances_customer
Revises: 0009_outbox_parked
"""

from alembic import op

revision = "0010_instances_customer"
down_revision = "0009_outbox_parked"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("instances_customer", "instances", ["customer_id"])


def downgrade() -> None:
    op.drop_index("instances_customer", "instances")
