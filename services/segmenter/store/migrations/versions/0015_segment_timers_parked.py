"""segment_timers_parked, segment_timers.attempts and .stalls: a due timer whose re-evaluation keeps
failing (not an outage, not a passing condition of the database), or whose pass alone keeps
stalling (a statement timeout every time), leaves the due timers, with the error

Claimed oldest first, such a timer failed every batch it was in, and every later due timer of every
customer stayed due behind it: time-based segments stopped flipping for everyone. The due-timer loop
now counts a try on a timer whose evaluation fails (`attempts`) or whose pass alone stalls
(`stalls`), tries it again later (`due_at` moves on), and parks it here after
CLM_SEGMENT_TIMER_MAX_ATTEMPTS failures or CLM_SEGMENT_TIMER_MAX_STALLS stalls in a row
(services/segmenter/due_timers.py).

Nothing is rewritten: a new table, and columns with a constant default (PostgreSQL records it in the
catalogue). The release before inserts, moves and claims timers without naming the columns, so both
run side by side. The columns still take `segment_timers`' lock for a moment: not waited for longer
than 5 s behind a long transaction (every event batch writing timers would queue behind the
migration), the start fails instead and is tried again; the downgrade likewise.

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
        sa.Column("stalls", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
    )
    # Erasure and merges remove a customer's rows.
    op.create_index("segment_timers_parked_customer", "segment_timers_parked", ["customer_id"])
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column("segment_timers", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.add_column("segment_timers", sa.Column("stalls", sa.Integer, nullable=False, server_default="0"))
    op.execute("SET LOCAL lock_timeout = DEFAULT")


def downgrade() -> None:
    # Not waited for behind a long transaction either: `segment_timers` is written by every event batch.
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Parked timers go back to the due ones, as they were due (past: the oldest due, claimed first by
    # the release before, which re-evaluates them, or fails its whole batch on them, again); a timer
    # written for the pair since (an evaluation since it was parked) is kept as it is.
    op.execute(
        "INSERT INTO segment_timers (customer_id, segment_id, due_at) "
        "SELECT customer_id, segment_id, due_at FROM segment_timers_parked ORDER BY customer_id, segment_id "
        "ON CONFLICT (customer_id, segment_id) DO NOTHING"
    )
    op.drop_table("segment_timers_parked")
    op.drop_column("segment_timers", "stalls")
    op.drop_column("segment_timers", "attempts")
    op.execute("SET LOCAL lock_timeout = DEFAULT")
