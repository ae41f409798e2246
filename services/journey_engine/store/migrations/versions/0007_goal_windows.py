"""goals count after the path ends: instances.converted_at, and goal_windows for finished instances

Revision ID: 0007_goal_windows
Revises: 0006_broadcast_progress
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_goal_windows"
down_revision = "0006_broadcast_progress"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # When the instance reached the journey's goal: while inside (status 'converted') or after it
    # finished, within the goal's window. Stats and A/B results count this, not the status.
    op.add_column("instances", sa.Column("converted_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE instances SET converted_at = updated_at WHERE status = 'converted'")
    # Finished instances whose goal may still be reached (one row each, gone once converted or expired).
    op.create_table(
        "goal_windows",
        sa.Column("instance_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("journey_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("correlation", sa.Text, nullable=False, server_default=""),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("goal_windows_customer", "goal_windows", ["customer_id"])
    op.create_index("goal_windows_journey", "goal_windows", ["journey_id"])
    op.create_index("goal_windows_open_until", "goal_windows", ["open_until"])


def downgrade() -> None:
    op.drop_table("goal_windows")
    op.drop_column("instances", "converted_at")
