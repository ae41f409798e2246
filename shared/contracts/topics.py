"""The registry of CLM's topics: name, key, schema, owner (the only producer)."""

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

    @property
    def dead_letter(self) -> str:
        return f"{self.name}.dlq"


CUSTOMER_EVENTS = TopicSpec(
    "clm.events.v1",
    CustomerEvent,
    "userId, else anonymousId",
    "ingest (journey_engine: `identify` for trait updates)",
    "Validated customer events (Segment spec), normalized timestamps.",
)
PROFILES = TopicSpec(
    "clm.profiles.v1",
    ProfileChanged,
    "canonical customer id",
    "segmenter",
    "Profile changes: traits, lifecycle stage and metrics, identity merges, erasure.",
)
SEGMENT_MEMBERSHIP = TopicSpec(
    "clm.segment-membership.v1",
    SegmentMembershipChanged,
    "canonical customer id",
    "segmenter",
    "Every segment enter/exit, once per actual change.",
)
MESSAGE_REQUESTS = TopicSpec(
    "clm.messages.requested.v1",
    MessageRequested,
    "canonical customer id",
    "journey_engine",
    "Requests to send one message (journey steps; transactional API sends are made by the notifier).",
)
MESSAGE_STATUS = TopicSpec(
    "clm.messages.status.v1",
    MessageStatus,
    "canonical customer id",
    "notifier (journey_engine: capped, skipped)",
    "Message outcomes: queued, sent, delivered, bounced, failed, suppressed, opened, clicked, ...",
)
PRIVACY = TopicSpec(
    "clm.privacy.v1",
    PrivacyRequest,
    "canonical customer id",
    "segmenter (requests), every service (confirmations)",
    "GDPR erasure requests and each service's confirmation.",
)

TEMPLATES = TopicSpec(
    "clm.templates.v1",
    TemplateChanged,
    "template id",
    "notifier",
    "Each template's latest state (channel, version, deleted), for checking journeys' references to them.",
    # The latest state per template is kept for ever, whatever the retention.
    config={"cleanup.policy": "compact"},
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
