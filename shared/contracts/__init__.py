"""Topic contracts: every topic's name, key, schema and owner, and the Kafka header names.

See `docs/architecture.md` and `docs/asyncapi.json` for the same contracts in prose.
"""

from shared.contracts.events import (
    Channel,
    ContractModel,
    CustomerEvent,
    EventType,
    MessageCategory,
    MessageRequested,
    MessageStatus,
    MessageStatusKind,
    PrivacyAction,
    PrivacyRequest,
    ProfileChanged,
    ProfileChangeKind,
    Recipient,
    SegmentMembershipChanged,
    TemplateChanged,
)
from shared.contracts.headers import Headers
from shared.contracts.topics import (
    CUSTOMER_EVENTS,
    MESSAGE_REQUESTS,
    MESSAGE_STATUS,
    PRIVACY,
    PROFILES,
    SEGMENT_MEMBERSHIP,
    TEMPLATES,
    TOPICS,
    TopicSpec,
)

__all__ = [
    "CUSTOMER_EVENTS",
    "MESSAGE_REQUESTS",
    "MESSAGE_STATUS",
    "PRIVACY",
    "PROFILES",
    "SEGMENT_MEMBERSHIP",
    "TEMPLATES",
    "TOPICS",
    "Channel",
    "ContractModel",
    "CustomerEvent",
    "EventType",
    "Headers",
    "MessageCategory",
    "MessageRequested",
    "MessageStatus",
    "MessageStatusKind",
    "PrivacyAction",
    "PrivacyRequest",
    "ProfileChangeKind",
    "ProfileChanged",
    "Recipient",
    "SegmentMembershipChanged",
    "TemplateChanged",
    "TopicSpec",
]
