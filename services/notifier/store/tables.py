"""The notifier schema's tables (declared without a schema: the engine's search_path picks it)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from shared.db import messaging_tables

metadata = sa.MetaData()
inbox, outbox = messaging_tables.define(metadata)

_now = sa.func.now()
TS = sa.DateTime(timezone=True)

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("default_locale", sa.Text, nullable=False),
    # locale -> part -> Liquid source
    sa.Column("variants", JSONB, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", TS, nullable=False, server_default=_now),
    sa.Column("updated_at", TS, nullable=False, server_default=_now),
)

# Projection of clm.profiles.v1: what a message needs to reach and address a customer.
contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("email", sa.Text),
    sa.Column("email_address", sa.Text),  # the mailbox in lower case (`domain.email_addresses`)
    sa.Column("phone", sa.Text),
    # `phone` in E.164 (`domain.phone_numbers`): an inbound STOP finds the customers by it.
    sa.Column("phone_e164", sa.Text),
    sa.Column("push_token", sa.Text),
    sa.Column("webhook_url", sa.Text),
    sa.Column("locale", sa.Text),
    sa.Column("timezone", sa.Text),
    sa.Column("traits", JSONB, nullable=False),
    sa.Column("profile_at", TS, nullable=False),
)

# One row per message id: the claim that makes a redelivered or retried request send at most once.
send_ledger = sa.Table(
    "send_ledger",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("category", sa.Text, nullable=False),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("request", JSONB, nullable=False),
    # pending -> claimed -> sending -> sent | delivered | failed | suppressed | bounced | unknown
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TS),
    sa.Column("claimed_at", TS),
    # Which claim owns the row (revision 0003_claim_token): a claim handed back cannot send any more.
    sa.Column("claim_token", sa.Text),
    # The request's correlation id (revision 0004_correlation_id), passed on by the message's statuses.
    sa.Column("correlation_id", sa.Text),
    sa.Column("provider", sa.Text),
    sa.Column("provider_message_id", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", TS, nullable=False, server_default=_now),
    sa.Column("updated_at", TS, nullable=False, server_default=_now),
)
sa.Index("contacts_phone_e164", contacts.c.phone_e164)
sa.Index("contacts_email_address", contacts.c.email_address)
sa.Index("send_ledger_due", send_ledger.c.next_attempt_at, postgresql_where=send_ledger.c.state == "pending")
sa.Index("send_ledger_created_at", send_ledger.c.created_at)  # the performance report's periods

# A provider's delivery report that came while an erasure held the gate (revision 0015), until the
# loop applies it (`Notifier.apply_deferred_reports`): its message by the provider's id, never the
# number it went to (the gone address as its suppression's salted hash).
deferred_provider_reports = sa.Table(
    "deferred_provider_reports",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("provider_message_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("gone_address_hash", sa.Text),
    sa.Column("gone_reason", sa.Text),
    sa.Column("received_at", TS, nullable=False),
    # Tries that failed, and when the next one is due (a failing report does not hold back the rest).
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.CheckConstraint("kind IN ('delivered', 'bounced', 'failed')", name="deferred_provider_reports_kind"),
)
# Not unique: an insert conflicting with a row an erasure is deleting would wait for the erasure.
sa.Index(
    "deferred_provider_reports_message",
    deferred_provider_reports.c.provider_message_id,
    deferred_provider_reports.c.kind,
)
sa.Index(
    "deferred_provider_reports_due",
    deferred_provider_reports.c.next_attempt_at,
    deferred_provider_reports.c.id,
)

# First open, each clicked URL, each unsubscribe of a message: one status each.
engagements = sa.Table(
    "engagements",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("detail", sa.Text, primary_key=True),
    sa.Column("occurred_at", TS, nullable=False),
)

subscription_topics = sa.Table(
    "subscription_topics",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("channels", JSONB, nullable=False),
    sa.Column("default_subscribed", sa.Boolean, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now),
    sa.Column("updated_at", TS, nullable=False, server_default=_now),
)

# The current choice per customer, topic (or "*": every marketing topic) and channel.
preferences = sa.Table(
    "preferences",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("subscribed", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

# Append-only history of every consent change: when, what, and through which source.
consent_ledger = sa.Table(
    "consent_ledger",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("subscribed", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text),
    sa.Column("occurred_at", TS, nullable=False),
)

# SMS STOP opts the number itself out of marketing SMS, whoever CLM thinks owns it (an override
# recipient, a changed profile phone): keyed by the salted hash of the number in E.164
# (`domain.consent.phone_key`), never the number, so an erasure leaves nothing of the customer here.
sms_address_optouts = sa.Table(
    "sms_address_optouts",
    metadata,
    sa.Column("phone_hash", sa.Text, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("opted_out_at", TS, nullable=False),
)

# A spam complaint opts the address itself out of marketing email (keyed like `address_suppressions`).
email_address_optouts = sa.Table(
    "email_address_optouts",
    metadata,
    sa.Column("address_hash", sa.Text, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("opted_out_at", TS, nullable=False),
)

# Addresses a provider said do not exist (hard bounces): no message goes to them until removed
# (`domain.suppression`). Keyed by the salted hash of the address, never the address.
address_suppressions = sa.Table(
    "address_suppressions",
    metadata,
    sa.Column("address_hash", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    # The provider's answer (its own words, never the address) and the message that bounced.
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("provider", sa.Text),
    sa.Column("message_id", sa.Text),
    sa.Column("suppressed_at", TS, nullable=False),
)

in_app_messages = sa.Table(
    "in_app_messages",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    sa.Column("message_id", sa.Text, nullable=False, unique=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("read_at", TS),
)

# Every identifier the segmenter resolves to a customer (clm.profiles.v1 `identities` and merged ids):
# the notifier's APIs take any of them, as the segmenter's do, and mean that customer.
customer_identities = sa.Table(
    "customer_identities",
    metadata,
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    sa.Column("linked_at", TS, nullable=False),
)

# POST /v1/messages: an Idempotency-Key maps to one message id (and the request it was used with).
api_requests = sa.Table(
    "api_requests",
    metadata,
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now),
)
