"""segment_timers_parked, segment_timers.attempts: a due timer whose re-evaluation keeps failing
alone (not an outage, not a passing condition of the database) leaves the due timers, with the error

Claimed oldest first, such a timer failed every batch it was in, and every later due timer of every
customer stayed due behind it: time-based segments stopped flipping for everyone. The due-timer loop
now takes a failed batch apart by halves; a timer that fails alone is tried again later (`attempts`
counts its tries, `due_at` moves on), and one that has failed CLM_SEGMENT_TIMER_MAX_ATTEMPTS times
is parked here (services/segmenter/due_timers.py).

Nothing is rewritten: a new table, and a column with a constant default (PostgreSQL records it in the
catalogue). The release before inserts, moves and claims timers without naming the column, so both
run side by side. The column still takes `segment_timers`' lock for a moment: not waited for longer
than 5 s behind a long transaction (every event batch writing timers would queue behind the
migration), the start fails instead and is tried again.

Revision ID: 0015_segment_timers_parked
Revises: 0014_backfill_failures
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_segment_timers_parked"
down_revision = "0014_backfill_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_timers_parked",
        sa.Column("segment_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
    )
    # Erasure and merges remove a customer's rows.
    op.create_index("segment_timers_parked_customer", "segment_timers_parked", ["customer_id"])
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column("segment_timers", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.execute("SET LOCAL lock_timeout = DEFAULT")


def downgrade() -> None:
    # Parked timers go back to the due ones (the release before re-evaluates them, or fails on them,
    # again); a timer written since for the same pair is kept, with the earlier due time.
    op.execute(
        "INSERT INTO segment_timers (customer_id, segment_id, due_at) "
        "SELECT customer_id, segment_id, due_at FROM segment_timers_parked "
        "ON CONFLICT (customer_id, segment_id) DO UPDATE "
        "SET due_at = LEAST(segment_timers.due_at, excluded.due_at)"
    )
    op.drop_table("segment_timers_parked")
    op.drop_column("segment_timers", "attempts")
