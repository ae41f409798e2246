"""segments: back-fill failures (`backfill_failures`, `backfill_stalls`, `backfill_error`,
`backfill_failed_at`, `backfill_failed_pass`) and the `failed` status

A segment whose back-fill chunk keeps failing goes behind the others after each failure, is retried
`backfill_retry_after_s` later, and is marked `failed` after `backfill_max_failures` of them in a
row (services/segmenter/schedules.py): before, it was claimed first on every pass and no other
segment was ever back-filled. Stalls (a passing cause such as a statement timeout, or an outage,
striking its chunk) are counted apart, `backfill_stalls`, each backing it off twice as long, and
`backfill_max_stalls` of them in a row without progress fail it too. A failure is charged to a
pass: `backfill_failed_pass` holds the `backfill_started_at` of the pass that had the chunk, and one
that does not match the segment's `backfill_started_at` is an earlier pass's (a release before this
one restarts passes without resetting these columns) and counts nothing.

Revision ID: 0014_backfill_failures
Revises: 0013_outbox_packed
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_backfill_failures"
down_revision = "0013_outbox_packed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segments", sa.Column("backfill_failures", sa.Integer, nullable=False, server_default="0"))
    op.add_column("segments", sa.Column("backfill_stalls", sa.Integer, nullable=False, server_default="0"))
    op.add_column("segments", sa.Column("backfill_error", sa.Text, nullable=True))
    op.add_column("segments", sa.Column("backfill_failed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("segments", sa.Column("backfill_failed_pass", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # `failed` segments stay so: an older release claims only `backfilling` ones, and would again
    # retry such a segment first on every pass.
    op.drop_column("segments", "backfill_failed_pass")
    op.drop_column("segments", "backfill_failed_at")
    op.drop_column("segments", "backfill_error")
    op.drop_column("segments", "backfill_stalls")
    op.drop_column("segments", "backfill_failures")
