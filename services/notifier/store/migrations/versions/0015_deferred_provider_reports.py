"""deferred_provider_reports: a provider's delivery report that came while an erasure held the gate,
kept until a loop applies it (or drops it, for a customer erased meanwhile)

Only what applying it needs: the provider's message id (which the send ledger row keeps), the
outcome, the provider's codes, and the address the report says does not exist as the salted hash
its suppression would be keyed by (HMAC-SHA256 with CLM_PRIVACY_SALT), never the number.

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
        # A report Twilio sends again while the first waits is the same report.
        sa.UniqueConstraint("provider_message_id", "kind", name="deferred_provider_reports_once"),
        # The outcomes a report applies; anything else would stop the loop on every pass.
        sa.CheckConstraint(
            "kind IN ('delivered', 'bounced', 'failed')", name="deferred_provider_reports_kind"
        ),
    )


def downgrade() -> None:
    op.drop_table("deferred_provider_reports")
