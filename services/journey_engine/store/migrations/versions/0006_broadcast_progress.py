"""journeys: how far the broadcast in progress got (its run time and the last member done)

Revision ID: 0006_broadcast_progress
Revises: 0005_identity_linked_at
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_broadcast_progress"
down_revision = "0005_identity_linked_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A broadcast enrols its segment in chunks, a transaction each: a crash resumes after the last
    # member of the last committed chunk, for the run it belongs to.
    op.add_column("journeys", sa.Column("broadcast_run_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("journeys", sa.Column("broadcast_cursor", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("journeys", "broadcast_cursor")
    op.drop_column("journeys", "broadcast_run_at")
