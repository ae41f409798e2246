"""journeys, versions, projections, instances, timers, counters, message log

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from services.journey_engine.store.tables import metadata

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = (
    "journeys",
    "journey_versions",
    "customers",
    "customer_identities",
    "segment_members",
    "instances",
    "enrolments",
    "timers",
    "node_counts",
    "message_log",
)


def upgrade() -> None:
    bind = op.get_bind()
    metadata.create_all(bind, tables=[metadata.tables[name] for name in TABLES])


def downgrade() -> None:
    bind = op.get_bind()
    metadata.drop_all(bind, tables=[metadata.tables[name] for name in reversed(TABLES)])
