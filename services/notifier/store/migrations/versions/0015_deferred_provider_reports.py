"""deferred_provider_reports: a provider's delivery report that came while an erasure held the gate,
kept until a loop applies it (or drops it, for a customer erased meanwhile)

Only what applying it needs: the provider's message id (which the send ledger row keeps), the
outcome, the provider's codes, and the address the report says does not exist as the salted hash
its suppression would be keyed by (HMAC-SHA256 with CLM_PRIVACY_SALT), never the number; and the
loop's tries that failed, with when the next is due.

Revision ID: 0015_deferred_provider_reports
Revises: 0014_email_address_u_labels
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_deferred_provider_reports"
down_revision = "0014_email_address_u_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deferred_provider_reports",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("provider_message_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("gone_address_hash", sa.Text),
        sa.Column("gone_reason", sa.Text),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        # The outcomes a report applies; anything else would fail every try.
        sa.CheckConstraint(
            "kind IN ('delivered', 'bounced', 'failed')", name="deferred_provider_reports_kind"
        ),
    )
    # Not unique: an insert conflicting with a row an erasure is deleting (uncommitted) would wait
    # for the erasure to commit. A report Twilio sends again while the first waits is mostly found
    # by its message and outcome and not kept; one kept twice settles as a duplicate.
    op.create_index(
        "deferred_provider_reports_message", "deferred_provider_reports", ["provider_message_id", "kind"]
    )
    op.create_index("deferred_provider_reports_due", "deferred_provider_reports", ["next_attempt_at", "id"])


def downgrade() -> None:
    """Drops the table with the reports still kept in it: those are lost (their messages keep the
    status they had, a gone number is not suppressed). Let the loop empty it first
    (`SELECT count(*) FROM deferred_provider_reports` is 0 once no erasure runs and no try fails)."""
    op.drop_table("deferred_provider_reports")
