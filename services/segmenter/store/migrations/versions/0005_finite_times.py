"""Repair infinite times: events stamped 0001-01-01 or 9999-12-31 stored -infinity / infinity

Revision ID: 0005_finite_times
Revises: 0004_identity_owner_index

Before 2026-11-29 ingest accepted any event time. asyncpg writes datetime.min/max as -infinity and
infinity and reads them back as naive datetimes, so one such event left its customer's profile (or
aggregate, or due timer) failing every later event of that customer. Ingest now refuses times
outside 1900-2999; this repairs what was stored: the profile's time fields become unknown (the next
event sets them), an aggregate keeps its finite end (or goes, with neither), a timer goes, a
timeline entry takes the time CLM received it.
"""

from alembic import op

revision = "0005_finite_times"
down_revision = "0004_identity_owner_index"
branch_labels = None
depends_on = None

_PROFILE_TIMES = ("first_seen", "last_seen", "first_order_at", "last_order_at")


def upgrade() -> None:
    for column in _PROFILE_TIMES:
        op.execute(f"UPDATE customers SET {column} = NULL WHERE NOT isfinite({column})")
    op.execute("DELETE FROM event_counts WHERE NOT isfinite(first_at) AND NOT isfinite(last_at)")
    op.execute(
        "UPDATE event_counts SET first_at = CASE WHEN isfinite(first_at) THEN first_at ELSE last_at END, "
        "last_at = CASE WHEN isfinite(last_at) THEN last_at ELSE first_at END "
        "WHERE NOT (isfinite(first_at) AND isfinite(last_at))"
    )
    op.execute("DELETE FROM segment_timers WHERE NOT isfinite(due_at)")
    # The timeline keeps the event, at the time CLM received it.
    op.execute("UPDATE events SET timestamp = received_at WHERE NOT isfinite(timestamp)")


def downgrade() -> None:
    pass  # nothing to undo: the infinite values were never meaningful
