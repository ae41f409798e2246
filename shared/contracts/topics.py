"""The registry of CLM's topics: name, key, schema, owner (its producers), consumers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.contracts.events import (
    ContractModel,
    CustomerEvent,
    MessageRequested,
    MessageStatus,
    PrivacyRequest,
    ProfileChanged,
    SegmentMembershipChanged,
    TemplateChanged,
)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: type[ContractModel]
    key: str
    owner: str
    description: str
    # Topic-level configs set when the topic is created (e.g. compaction).
    config: Mapping[str, str] = field(default_factory=dict)
    # (service, purpose) of each consumer: its group is `<prefix>clm.<service>.<purpose>`. A test holds
    # this to what the services register.
    consumers: tuple[tuple[str, str], ...] = ()
    # Who writes to the dead-letter topic besides the consumers that give up, and what.
    dead_letter_writers: str = ""

    @property
    def dead_letter(self) -> str:
        return f"{self.name}.dlq"


CUSTOMER_EVENTS = TopicSpec(
    "clm.events.v1",
    CustomerEvent,
    "userId, else anonymousId",
    "ingest (journey_engine: `identify` for trait updates)",
    "Validated customer events (Segment spec), normalized timestamps.",
    consumers=(("segmenter", "profiles"), ("journey_engine", "events")),
)
PROFILES = TopicSpec(
    "clm.profiles.v1",
    ProfileChanged,
    "canonical customer id",
    "segmenter",
    "Profile changes: traits, lifecycle stage and metrics, identity merges, erasure; snapshots re-announce "
    "profiles as they are.",
    consumers=(("journey_engine", "profiles"), ("notifier", "profiles")),
)
SEGMENT_MEMBERSHIP = TopicSpec(
    "clm.segment-membership.v1",
    SegmentMembershipChanged,
    "canonical customer id",
    "segmenter",
    "Segment entries and exits, once per actual change; messages with cause `resync` re-announce "
    "memberships as they are (not changes).",
    consumers=(("journey_engine", "segments"),),
)
MESSAGE_REQUESTS = TopicSpec(
    "clm.messages.requested.v1",
    MessageRequested,
    "canonical customer id",
    "journey_engine",
    "Requests to send one message (journey steps; transactional API sends are made by the notifier).",
    consumers=(("notifier", "message-requests"),),
    dead_letter_writers="Also written through the notifier's outbox: a request whose sends failed "
    "`send_max_attempts` times, its `MessageRequested` re-serialized, keyed by customer id, "
    "with its CLM headers and `clm-dlq-source: notifier.send_ledger`, `clm-dlq-group: "
    "<prefix>clm.notifier.delivery` (its delivery worker, not a consumer group).",
)
MESSAGE_STATUS = TopicSpec(
    "clm.messages.status.v1",
    MessageStatus,
    "canonical customer id",
    "notifier (journey_engine: capped, skipped)",
    "Message outcomes: queued, sent, delivered, bounced, failed, suppressed, opened, clicked, ...",
    consumers=(("segmenter", "engagement"), ("journey_engine", "statuses")),
)
PRIVACY = TopicSpec(
    "clm.privacy.v1",
    PrivacyRequest,
    "canonical customer id",
    "segmenter (requests, and its own erase_completed), every service (answers)",
    "Erasure and export requests (segmenter) and each service's answers: erase_completed, export_part "
    "(chunked).",
    consumers=(
        ("ingest", "privacy"),
        ("segmenter", "privacy"),
        ("journey_engine", "privacy"),
        ("notifier", "privacy"),
    ),
)

TEMPLATES = TopicSpec(
    "clm.templates.v1",
    TemplateChanged,
    "template id",
    "notifier",
    "Each template's latest state (channel, version, deleted), for checking journeys' references to them.",
    # The latest state per template is kept for ever, whatever the retention.
    config={"cleanup.policy": "compact"},
    consumers=(("journey_engine", "templates"),),
)

TOPICS: tuple[TopicSpec, ...] = (
    CUSTOMER_EVENTS,
    PROFILES,
    SEGMENT_MEMBERSHIP,
    MESSAGE_REQUESTS,
    MESSAGE_STATUS,
    PRIVACY,
    TEMPLATES,
)
