"""The journey_engine schema's tables (declared without a schema: the engine's search_path picks it)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from shared.db import messaging_tables

metadata = sa.MetaData()
inbox, outbox = messaging_tables.define(metadata)


def _now() -> sa.Column[object]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


journeys = sa.Table(
    "journeys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    # draft -> active -> paused -> archived
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("current_version", sa.Integer, nullable=False),
    sa.Column("entry_cap", sa.Integer, nullable=True),
    sa.Column("entered_count", sa.BigInteger, nullable=False, server_default="0"),
    # Scheduled broadcasts (and enrolment of current segment members): when the next run is due.
    sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
    # The broadcast in progress (revision 0006): its run time and the last member enrolled, so the
    # next chunk (or a restart after a crash) resumes there.
    sa.Column("broadcast_run_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("broadcast_cursor", sa.Text, nullable=True),
    _now(),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

journey_versions = sa.Table(
    "journey_versions",
    metadata,
    sa.Column("journey_id", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("definition", JSONB, nullable=False),
    _now(),
)

# A projection of clm.profiles.v1: what templates and conditions need about each customer.
customers = sa.Table(
    "customers",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("traits", JSONB, nullable=False, server_default="{}"),
    sa.Column("timezone", sa.Text, nullable=True),
    sa.Column("locale", sa.Text, nullable=True),
    sa.Column("email", sa.Text, nullable=True),
    sa.Column("phone", sa.Text, nullable=True),
    sa.Column("stage", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

customer_identities = sa.Table(
    "customer_identities",
    metadata,
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    # The announcement's time (revision 0005): a late one about a merged-away profile (another key, so
    # another partition) must not take its identifiers back from the survivor.
    sa.Column(
        "linked_at",
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.text("'1900-01-01T00:00:00Z'"),
    ),
)

# Profiles merged into another (revision 0011): whatever arrives for them later (a membership or a
# profile announcement sent before the merge) is no person's any more; a merge into one of them goes
# on to where it was merged.
merged_profiles = sa.Table(
    "merged_profiles",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("merged_into", sa.Text, nullable=False),
    sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
)

# A projection of clm.segment-membership.v1.
segment_members = sa.Table(
    "segment_members",
    metadata,
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Index("segment_members_customer", "customer_id"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("journey_id", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("correlation", sa.Text, nullable=False, server_default=""),
    # active | exited | converted
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("wait", JSONB, nullable=True),
    sa.Column("context", JSONB, nullable=False, server_default="{}"),
    # Bumped on every step: a timer armed for an older step is stale and fires as a no-op.
    sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("exit_reason", sa.Text, nullable=True),
    # When the goal was reached (revision 0007): while inside (status converted) or after finishing,
    # within the goal's window. What stats and A/B results count.
    sa.Column("converted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("instances_active_customer", "customer_id", postgresql_where=sa.text("status = 'active'")),
    # Any status (revision 0010): a merge moves the merged-away profile's finished instances too.
    sa.Index("instances_customer", "customer_id"),
    sa.Index(
        "instances_active_once_per_key",
        "journey_id",
        "customer_id",
        "correlation",
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    ),
)

# The last entry per (journey, customer, correlation value): the re-entry policy's memory.
enrolments = sa.Table(
    "enrolments",
    metadata,
    sa.Column("journey_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("correlation", sa.Text, primary_key=True),
    sa.Column("last_entered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("entries", sa.Integer, nullable=False, server_default="1"),
    # Each batch reads its customers' past entries (the key leads with the journey).
    sa.Index("enrolments_customer", "customer_id"),
)

# Finished (exited) instances whose goal may still be reached: until `open_until` (entry + the goal's
# `within`; NULL: no limit, until the journey is archived). Deleted once converted or expired.
goal_windows = sa.Table(
    "goal_windows",
    metadata,
    sa.Column("instance_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("journey_id", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # Where the instance finished: its conversion is counted there.
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("correlation", sa.Text, nullable=False, server_default=""),
    sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
    sa.Index("goal_windows_customer", "customer_id"),
    sa.Index("goal_windows_journey", "journey_id"),
    sa.Index("goal_windows_open_until", "open_until"),
)

timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("instance_id", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    # Tries whose step failed alone for a reason of its own (revision 0013; not an outage, not a
    # transient condition such as a deadlock): each moves `due_at` on by `CLM_TIMER_RETRY_S`, doubled
    # each time. A release before this one inserts and claims rows without it.
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Index("timers_due", "due_at"),
)

# Timers whose step failed alone `CLM_TIMER_MAX_ATTEMPTS` times for a reason of its own (a bug, a
# constraint), out of the due timers with the last error (revision 0013): claimed oldest first, such a
# timer failed every batch it was in and held back every later one. The instance waits where it was
# until an operator requeues the timer (back into `timers` under its id, due now, no tries counted)
# or discards it (the instance exits): `api/parked_timers.py`, `store/parked.py`.
timers_parked = sa.Table(
    "timers_parked",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),  # the timer's
    sa.Column("instance_id", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    # Erasure and export find a customer's timers by their instances.
    sa.Index("timers_parked_instance", "instance_id"),
)

# Insert-only per-step counters (summed on read): no hot row for parallel engine processes to fight over.
node_counts = sa.Table(
    "node_counts",
    metadata,
    sa.Column("journey_id", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("metric", sa.Text, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Index("node_counts_journey", "journey_id"),
)

# Every message decision: requested (counts toward frequency caps), capped, skipped.
message_log = sa.Table(
    "message_log",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("category", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("journey_id", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("instance_id", sa.Text, nullable=False),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("message_log_customer", "customer_id", "decided_at"),
)

# The notifier's templates as announced on clm.templates.v1 (revision 0008): journeys' references to
# them are checked when saved, activated or dry-run (warnings, not errors).
known_templates = sa.Table(
    "known_templates",
    metadata,
    sa.Column("template_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
)
