"""templates, contacts, send ledger, engagements, consent, in-app inbox, API idempotency keys

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

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    now = sa.func.now()
    op.create_table(
        "templates",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("default_locale", sa.Text, nullable=False),
        sa.Column("variants", JSONB, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", TS, nullable=False, server_default=now),
        sa.Column("updated_at", TS, nullable=False, server_default=now),
    )
    op.create_table(
        "contacts",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("push_token", sa.Text),
        sa.Column("webhook_url", sa.Text),
        sa.Column("locale", sa.Text),
        sa.Column("timezone", sa.Text),
        sa.Column("traits", JSONB, nullable=False),
        sa.Column("profile_at", TS, nullable=False),
    )
    op.create_index("contacts_phone", "contacts", ["phone"])
    op.create_table(
        "send_ledger",
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("template_id", sa.Text, nullable=False),
        sa.Column("request", JSONB, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS),
        sa.Column("claimed_at", TS),
        sa.Column("provider", sa.Text),
        sa.Column("provider_message_id", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", TS, nullable=False, server_default=now),
        sa.Column("updated_at", TS, nullable=False, server_default=now),
    )
    op.create_index(
        "send_ledger_due", "send_ledger", ["next_attempt_at"], postgresql_where=sa.text("state = 'pending'")
    )
    op.create_index(
        "send_ledger_sending", "send_ledger", ["claimed_at"], postgresql_where=sa.text("state = 'sending'")
    )
    op.create_index("send_ledger_customer", "send_ledger", ["customer_id", "channel", "created_at"])
    op.create_index("send_ledger_provider_message", "send_ledger", ["provider_message_id"])
    op.create_table(
        "engagements",
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("detail", sa.Text, primary_key=True),
        sa.Column("occurred_at", TS, nullable=False),
    )
    op.create_table(
        "subscription_topics",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("channels", JSONB, nullable=False),
        sa.Column("default_subscribed", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=now),
        sa.Column("updated_at", TS, nullable=False, server_default=now),
    )
    op.create_table(
        "preferences",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("subscribed", sa.Boolean, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "consent_ledger",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("subscribed", sa.Boolean, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text),
        sa.Column("occurred_at", TS, nullable=False),
    )
    op.create_index("consent_ledger_customer", "consent_ledger", ["customer_id"])
    op.create_table(
        "in_app_messages",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False, unique=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("read_at", TS),
    )
    op.create_index("in_app_messages_customer", "in_app_messages", ["customer_id"])
    op.create_table(
        "api_requests",
        sa.Column("idempotency_key", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=now),
    )


def downgrade() -> None:
    for table in (
        "api_requests",
        "in_app_messages",
        "consent_ledger",
        "preferences",
        "subscription_topics",
        "engagements",
        "send_ledger",
        "contacts",
        "templates",
    ):
        op.drop_table(table)
