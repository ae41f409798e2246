"""The segmenter schema's tables (declared without a schema: the engine's search_path picks it).

Profiles are one row per canonical customer in `customers` with plain columns for the commerce
aggregates, so later issues (lifecycle stage and metrics, recommendations) add columns or tables
next to it without touching the rest.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from shared.db import messaging_tables

metadata = sa.MetaData()
inbox, outbox = messaging_tables.define(metadata)

TS = sa.DateTime(timezone=True)

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("traits", JSONB, nullable=False, server_default="{}"),
    # trait name -> ISO time of the event that last set it (last write by event time wins).
    sa.Column("trait_times", JSONB, nullable=False, server_default="{}"),
    sa.Column("first_seen", TS, nullable=True),
    sa.Column("last_seen", TS, nullable=True),
    sa.Column("event_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("orders_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revenue", sa.Float, nullable=False, server_default="0"),
    sa.Column("first_order_at", TS, nullable=True),
    sa.Column("last_order_at", TS, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),  # user | anon | merged (a former canonical id)
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("linked_at", TS, nullable=False, server_default=sa.func.now()),
    # "Does this customer hold a userId" (identity lookup) is one probe; also serves customer_id alone.
    sa.Index("identities_customer_kind", "customer_id", "kind"),
)

merges = sa.Table(
    "merges",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    # The customer the merged profile belongs to now (updated when that one is merged in turn).
    sa.Column("canonical_id", sa.Text, nullable=False, index=True),
    sa.Column("into_id", sa.Text, nullable=False),
    sa.Column("from_id", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("identifiers", JSONB, nullable=False),
    sa.Column("merged_at", TS, nullable=False),
)

event_counts = sa.Table(
    "event_counts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("event", sa.Text, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("first_at", TS, nullable=False),
    sa.Column("last_at", TS, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("event", sa.Text, nullable=True),  # the aggregate name (track event, Page Viewed, ...)
    sa.Column("properties", JSONB, nullable=False),
    sa.Column("traits", JSONB, nullable=False),
    sa.Column("timestamp", TS, nullable=False),
    sa.Column("received_at", TS, nullable=False),
    sa.Index("events_customer_event_time", "customer_id", "event", "timestamp"),
    sa.Index("events_customer_time", "customer_id", "timestamp", "seq"),
)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("definition", JSONB, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("status", sa.Text, nullable=False),  # backfilling | ready | failed
    sa.Column("backfill_cursor", sa.Text, nullable=True),
    sa.Column("backfill_done", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("backfill_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("backfill_started_at", TS, nullable=True),
    sa.Column("backfill_finished_at", TS, nullable=True),
    # Revision 0014 adds backfill_failures (failed chunks of the current pass in a row), backfill_error
    # and backfill_failed_at (the last failure's; one before backfill_started_at is an older pass's):
    # not declared here, revision 0002 creates the table from these.
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("is_member", sa.Boolean, nullable=False),
    # Counts enter/exit transitions: the announcement's event id is (customer, segment, transition).
    sa.Column("transitions", sa.Integer, nullable=False),
    sa.Column("changed_at", TS, nullable=False),
    sa.Column("cause", sa.Text, nullable=False),
    sa.Index("memberships_customer", "customer_id"),
)

segment_timers = sa.Table(
    "segment_timers",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("due_at", TS, nullable=False, index=True),
    # Revision 0015 adds `attempts` and `stalls` (tries whose re-evaluation failed, passes of it alone
    # that stalled, in a row: `due_timers.py`): not declared here, revision 0002 creates the table
    # from these.
)

# Due timers whose re-evaluation failed CLM_SEGMENT_TIMER_MAX_ATTEMPTS times, or whose pass alone
# stalled CLM_SEGMENT_TIMER_MAX_STALLS times, in a row, out of the due ones with the last error: the
# customer's time-based membership of the segment waits until an event of theirs the segment names,
# a back-fill of the segment, or a requeue (revision 0015).
segment_timers_parked = sa.Table(
    "segment_timers_parked",
    metadata,
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("due_at", TS, nullable=False),  # when it was due at its last try
    sa.Column("parked_at", TS, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("stalls", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Index("segment_timers_parked_customer", "customer_id"),
)

# A deleted segment's row is gone at once (real time and the API no longer see it); its memberships,
# timers and members' exits are removed in a second transaction, taken from here (revision 0010).
segment_deletions = sa.Table(
    "segment_deletions",
    metadata,
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("requested_at", TS, nullable=False),
)
