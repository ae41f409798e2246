"""Repair infinite revenue: order amounts past 1e308 summed to Infinity

Revision ID: 0006_finite_revenue
Revises: 0005_finite_times

Before 2026-11-29 any order amount counted. A profile's revenue summed past float8 became Infinity
(its profile API answered 500, JSON has no Infinity) and the aggregates query overflowed (every later
event of the customer failed). Amounts past 1e12 now count nothing (`domain.profile.order_revenue`);
such a revenue is recomputed from the customer's timeline the same way.
"""

from alembic import op

from services.segmenter.store.lifecycle import ORDER_AMOUNT_SQL

revision = "0006_finite_revenue"
down_revision = "0005_finite_times"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE customers c SET revenue = coalesce((SELECT sum("
        + ORDER_AMOUNT_SQL
        + ") FROM events e WHERE e.customer_id = c.customer_id AND e.event = 'Order Completed'), 0) "
        "WHERE revenue IN ('Infinity'::float8, '-Infinity'::float8, 'NaN'::float8)"
    )


def downgrade() -> None:
    pass  # nothing to undo: an infinite revenue was never meaningful
