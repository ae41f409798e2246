"""timers_parked, timers.attempts: a timer whose step keeps failing alone (not an outage, not a
transient condition) leaves the due timers, with the error

Claimed oldest first, such a timer failed every batch it was in, and the timers of every journey
stayed due behind it. The timer loop now takes a failed batch apart; a timer that fails alone is
tried again later (`attempts` counts its tries, `due_at` moves on), and one that has failed
CLM_TIMER_MAX_ATTEMPTS times is parked here; its instance waits where it was.

Nothing is rewritten: a new table, and a column with a constant default (PostgreSQL records it in the
catalogue). The release before inserts and claims timers without naming the column, so both run side
by side. The column still takes `timers`' lock for a moment: not waited for longer than 5 s behind a
long transaction (every timer worker would queue behind the migration), the start fails instead and
is tried again.

Revision ID: 0013_timers_parked
Revises: 0012_outbox_packed
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_timers_parked"
down_revision = "0012_outbox_packed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "timers_parked",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("instance_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
    )
    op.create_index("timers_parked_instance", "timers_parked", ["instance_id"])
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column("timers", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.execute("SET LOCAL lock_timeout = DEFAULT")


def downgrade() -> None:
    # Parked timers go back to the due ones (the release before fires them, or fails on them, again).
    op.execute(
        "INSERT INTO timers (instance_id, seq, due_at) SELECT instance_id, seq, due_at FROM timers_parked "
        "ORDER BY id"
    )
    op.drop_table("timers_parked")
    op.drop_column("timers", "attempts")
