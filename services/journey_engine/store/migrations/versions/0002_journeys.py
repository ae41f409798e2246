"""journeys, versions, projections, instances, timers, counters, message log

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False, now: bool = False) -> sa.Column[object]:
    default = sa.func.now() if now else None
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=default)


def upgrade() -> None:
    op.create_table(
        "journeys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("entry_cap", sa.Integer, nullable=True),
        sa.Column("entered_count", sa.BigInteger, nullable=False, server_default="0"),
        _ts("next_run_at", nullable=True),
        _ts("created_at", now=True),
        _ts("updated_at", now=True),
    )
    op.create_table(
        "journey_versions",
        sa.Column("journey_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("definition", JSONB, nullable=False),
        _ts("created_at", now=True),
    )
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("traits", JSONB, nullable=False, server_default="{}"),
        sa.Column("timezone", sa.Text),
        sa.Column("locale", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("stage", sa.Text),
        _ts("updated_at", now=True),
    )
    op.create_table(
        "customer_identities",
        sa.Column("identity", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
    )
    op.create_index("ix_customer_identities_customer_id", "customer_identities", ["customer_id"])
    op.create_table(
        "segment_members",
        sa.Column("segment_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, primary_key=True),
    )
    op.create_index("segment_members_customer", "segment_members", ["customer_id"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("journey_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("correlation", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("wait", JSONB, nullable=True),
        sa.Column("context", JSONB, nullable=False, server_default="{}"),
        sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
        _ts("entered_at"),
        _ts("updated_at"),
        sa.Column("exit_reason", sa.Text, nullable=True),
    )
    op.create_index(
        "instances_active_customer",
        "instances",
        ["customer_id"],
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index(
        "instances_active_once_per_key",
        "instances",
        ["journey_id", "customer_id", "correlation"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "enrolments",
        sa.Column("journey_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("correlation", sa.Text, primary_key=True),
        _ts("last_entered_at"),
        sa.Column("entries", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_table(
        "timers",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("instance_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        _ts("due_at"),
    )
    op.create_index("timers_due", "timers", ["due_at"])
    op.create_table(
        "node_counts",
        sa.Column("journey_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("metric", sa.Text, nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_index("node_counts_journey", "node_counts", ["journey_id"])
    op.create_table(
        "message_log",
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("template_id", sa.Text, nullable=False),
        sa.Column("journey_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("instance_id", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        _ts("decided_at"),
    )
    op.create_index("message_log_customer", "message_log", ["customer_id", "decided_at"])


def downgrade() -> None:
    for table in (
        "message_log",
        "node_counts",
        "timers",
        "enrolments",
        "instances",
        "segment_members",
        "customer_identities",
        "customers",
        "journey_versions",
        "journeys",
    ):
        op.drop_table(table)
