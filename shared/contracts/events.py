"""Versioned pydantic models of every message on CLM's topics.

A breaking change to a model means a new topic version (`...v2`), never an in-place edit;
adding an optional field is compatible. Consumers ignore fields they do not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

JsonObject = dict[str, Any]


class ContractModel(BaseModel):
    """Base of every topic payload: forward compatible (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: ClassVar[int] = 1
    event_type: ClassVar[str] = "unknown"

    def contract_id(self) -> str:
        """The id consumers dedupe on (also sent as the `clm-event-id` header)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- clm.events.v1


class EventType(StrEnum):
    IDENTIFY = "identify"
    TRACK = "track"
    PAGE = "page"
    SCREEN = "screen"
    GROUP = "group"
    ALIAS = "alias"


class CustomerEvent(ContractModel):
    """A customer event as accepted by ingest: the Segment spec with normalized timestamps.

    Field names are Segment's (camelCase on the wire). Keyed by `userId`, else `anonymousId`.
    """

    model_config = ConfigDict(
        extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True
    )
    event_type: ClassVar[str] = "customer_event"

    message_id: str
    type: EventType
    user_id: str | None = None
    anonymous_id: str | None = None
    event: str | None = None
    name: str | None = None
    category: str | None = None
    properties: JsonObject = Field(default_factory=dict)
    traits: JsonObject = Field(default_factory=dict)
    context: JsonObject = Field(default_factory=dict)
    integrations: JsonObject = Field(default_factory=dict)
    previous_id: str | None = None
    group_id: str | None = None
    # Normalized: `timestamp` is corrected for client clock skew; `received_at` is the server clock.
    timestamp: datetime
    original_timestamp: datetime | None = None
    sent_at: datetime | None = None
    received_at: datetime
    # Which write key (by id, never the secret) sent it; "backfill" for historical imports;
    # "journey_engine" for the journey engine's `identify` events (trait-update steps).
    source: str | None = None
    # Set only by CLM's own services (ingest never does): the canonical customer the event is about.
    # The segmenter folds it into that profile (or the one it was merged into) without linking the
    # event's identifiers; one it does not know falls back to `userId` / `anonymousId`.
    customer_id: str | None = None

    def contract_id(self) -> str:
        return self.message_id

    @property
    def customer_key(self) -> str:
        key = self.user_id or self.anonymous_id
        assert key is not None, "ingest guarantees userId or anonymousId"
        return key


# --------------------------------------------------------------------------- clm.profiles.v1


class ProfileChangeKind(StrEnum):
    TRAITS_CHANGED = "traits_changed"
    STAGE_CHANGED = "stage_changed"
    # Reserved, never produced: metrics go out with `stage_changed`.
    METRICS_CHANGED = "metrics_changed"
    IDENTITY_MERGED = "identity_merged"
    # The customer gained identifiers (a userId for an anonymous visitor, a second anonymousId...):
    # `identities` holds them all, so consumers resolve any of them to `customer_id`. A large set is
    # split: the change itself carries a first part, further `identity_linked` messages the rest (same
    # traits, nothing changed), so a consumer adds the identities a message names, never drops others.
    IDENTITY_LINKED = "identity_linked"
    # The profile as it is, re-announced on an operator's request (a restored or new consumer rebuilds
    # its projection from these): nothing changed, so nothing reacts as to a change.
    SNAPSHOT = "snapshot"
    ERASED = "erased"


class ProfileChanged(ContractModel):
    """A change to a canonical customer profile that other services need. Keyed by `customer_id`."""

    event_type: ClassVar[str] = "profile_changed"

    event_id: str
    customer_id: str
    kind: ProfileChangeKind
    occurred_at: datetime = Field(
        description="When the profile state the message carries was current: the time the segmenter "
        "dated the change it announces by (every message of one change has the same; never earlier "
        "than the profile's previous change); on a snapshot, on the lists of a recommendations "
        "recompute and on the stage changes of a lifecycle refit or policy recompute, the time of the "
        "profile's last change before it (they carry its traits as that change left them). Lists are "
        "never dated earlier than the lists they replace. A projection that keeps the newest per "
        "customer (ties: the later message) follows the profile; so does one that keeps the last "
        "message of its partition.",
    )
    # Full current traits, so a consumer's projection never needs to replay history.
    traits: JsonObject = Field(default_factory=dict)
    changed_traits: list[str] = Field(default_factory=list)
    identities: dict[str, list[str]] = Field(default_factory=dict)
    lifecycle_stage: str | None = Field(
        default=None,
        description="Set on stage_changed (the new stage) and snapshot (the stored stage, null when none); "
        "on other kinds null means unchanged: keep the stage you have.",
    )
    previous_stage: str | None = None
    metrics: JsonObject = Field(
        default_factory=dict,
        description="Lifecycle metrics (churn_risk, p_alive, expected_orders, predicted_clv, rfm_score, "
        "nps_category), on stage_changed only; empty on other kinds (snapshots included).",
    )
    # IDENTITY_MERGED: the profile ids folded into `customer_id`, and why.
    merged_ids: list[str] = Field(default_factory=list)
    merge_cause: str | None = None
    caused_by: str | None = None
    # The customer's current recommendation lists when they changed (issue 9), as template
    # variables: {"cross_sell": [{product_id, name, category, price, url, image_url, reason, ...}],
    # "upsell": [...]}, on a `traits_changed` announcing them. None = unchanged / not computed (keep
    # what you have): every other message, snapshots included.
    recommendations: JsonObject | None = None

    def contract_id(self) -> str:
        return self.event_id


# --------------------------------------------------------------------------- clm.segment-membership.v1


# The `cause` of a membership re-announced as it is (`POST /v1/admin/republish-profiles`): state for a
# consumer's projection, not a change, so nothing reacts to it as to an entry or exit.
RESYNC_CAUSE = "resync"


class SegmentMembershipChanged(ContractModel):
    """A customer entered or exited a segment. Keyed by `customer_id`; one message per actual change,
    except those with cause `resync` (`RESYNC_CAUSE`): memberships re-announced as they are.

    `traits` are the customer's full current traits (empty on the exits of a profile merged into
    another)."""

    event_type: ClassVar[str] = "segment_membership_changed"

    event_id: str
    customer_id: str
    segment_id: str
    segment_name: str
    change: Literal["entered", "exited"]
    occurred_at: datetime
    # What caused it: an event's messageId, "schedule" (a time-based condition flipped),
    # "backfill" (new or edited segment), "merge", "segment_deleted" or "resync" (`RESYNC_CAUSE`).
    cause: str
    traits: JsonObject = Field(default_factory=dict)

    def contract_id(self) -> str:
        return self.event_id


# --------------------------------------------------------------------------- clm.messages.*


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    WEBHOOK = "webhook"
    IN_APP = "in_app"


class MessageCategory(StrEnum):
    MARKETING = "marketing"
    TRANSACTIONAL = "transactional"


class Recipient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    email: str | None = None
    phone: str | None = None
    push_token: str | None = None
    webhook_url: str | None = None
    timezone: str | None = None
    locale: str | None = None


# The keys of a message request's `data` that the notifier merges with what it knows itself (the
# profile's traits, the journey's ids): each must be an object; absent or null add nothing.
MESSAGE_DATA_OBJECTS = ("traits", "journey")
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def message_data_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) for each key of `MessageRequested.data` that cannot be merged (empty when
    usable). The notifier fails such a request with the problem as its reason; journeys and the
    notifier's API refuse such data up front."""
    return [
        (f"data.{key}", f"must be an object (or null), not {_JSON_KINDS.get(type(value), 'a scalar')}")
        for key in MESSAGE_DATA_OBJECTS
        if (value := data.get(key)) is not None and not isinstance(value, dict)
    ]


class MessageRequested(ContractModel):
    """A request to send one message. Keyed by `customer_id`.

    `message_id` is stable for the step that asked for it (journey, version, instance, node), so a
    redelivered request is recognized by the notifier's send ledger and never sent twice.
    `data`'s `traits` and `journey`, when present, are objects (`message_data_problems`).
    """

    event_type: ClassVar[str] = "message_requested"

    message_id: str
    customer_id: str
    channel: Channel
    template_id: str
    category: MessageCategory = MessageCategory.MARKETING
    subscription_topic: str | None = None
    recipient: Recipient = Field(default_factory=Recipient)
    # What the template may use: {"traits": {...}, "event": {...}, "journey": {...}, ...}
    data: JsonObject = Field(default_factory=dict)
    journey_id: str | None = None
    journey_version: int | None = None
    instance_id: str | None = None
    node_id: str | None = None
    requested_at: datetime

    def contract_id(self) -> str:
        return self.message_id


class MessageStatusKind(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    OPENED = "opened"
    CLICKED = "clicked"
    UNSUBSCRIBED = "unsubscribed"
    # Decided by the journey engine before a request is made (frequency cap, quiet hours).
    CAPPED = "capped"
    SKIPPED = "skipped"


class MessageStatus(ContractModel):
    """An outcome of a message. Keyed by `customer_id`."""

    event_type: ClassVar[str] = "message_status"

    status_id: str
    message_id: str
    customer_id: str
    status: MessageStatusKind
    channel: Channel
    occurred_at: datetime
    reason: str | None = None
    provider: str | None = None
    url: str | None = None
    template_id: str | None = None
    category: MessageCategory | None = None
    journey_id: str | None = None
    journey_version: int | None = None
    instance_id: str | None = None
    node_id: str | None = None

    def contract_id(self) -> str:
        return self.status_id


# --------------------------------------------------------------------------- clm.privacy.v1


class PrivacyAction(StrEnum):
    ERASE_REQUESTED = "erase_requested"
    ERASE_COMPLETED = "erase_completed"
    # Export is a request/answer over Kafka: each service answers with the part it holds.
    EXPORT_REQUESTED = "export_requested"
    EXPORT_PART = "export_part"


class PrivacyRequest(ContractModel):
    """An erasure or export request, and each service's answer to it. Keyed by `customer_id`."""

    event_type: ClassVar[str] = "privacy_request"

    event_id: str
    request_id: str
    action: PrivacyAction
    customer_id: str
    # Every id the customer was known by (userId, anonymousIds, emails), so each service can find them;
    # or, in a request sent in `parts` messages, this message's share of them. Answers leave it empty.
    identities: list[str] = Field(default_factory=list)
    service: str | None = None
    occurred_at: datetime
    # EXPORT_PART: everything the answering service holds on the customer (table name -> rows), or
    # when that is too large for one message, one chunk of it (`shared.privacy.answers`).
    data: JsonObject = Field(default_factory=dict)
    # An answer too large for one Kafka message goes as `chunks` messages, numbered 0..chunks-1, each
    # with a share of `data`'s rows (rows of one table in order across chunks; other values whole, in
    # the first chunk with room)
    # and the same `occurred_at`. The part has arrived when every chunk has. Defaults: one message.
    chunk: int = Field(
        default=0,
        ge=0,
        description="This message's share of the answer, 0-based (0 when the answer is one message).",
    )
    chunks: int = Field(
        default=1,
        ge=1,
        description="How many messages the answer's data was split into (1: this message holds it all). "
        "Rows of a table are concatenated in chunk order; the chunks of one answer share occurred_at.",
    )

    # A request naming more identifiers than one message may carry goes as `parts` messages, numbered
    # 0..parts-1, each with a share of `identities` (and the same `customer_id`); each service handles
    # and answers every part on its own (an answer's `part`/`parts` are its request's), and the
    # segmenter records a service's answer once it answered every part. Defaults: one message.
    part: int = Field(
        default=0,
        ge=0,
        description="The request's share of the identities this message holds (or, in an answer, the "
        "share it answers), 0-based; 0 when the request is one message.",
    )
    parts: int = Field(
        default=1,
        ge=1,
        description="How many messages the request's identities were split into (1: this one names all).",
    )

    @model_validator(mode="after")
    def _chunk_in_range(self) -> PrivacyRequest:
        if self.chunk >= self.chunks:
            raise ValueError(f"chunk {self.chunk} out of range: the answer has {self.chunks} chunks")
        if self.part >= self.parts:
            raise ValueError(f"part {self.part} out of range: the request has {self.parts} parts")
        return self

    def contract_id(self) -> str:
        return self.event_id


# --------------------------------------------------------------------------- clm.templates.v1


class TemplateChanged(ContractModel):
    """A message template was saved or deleted in the notifier: what others need to check a reference
    to it (which channel it renders for), never its content. Keyed by `template_id` on a compacted
    topic, so a new consumer reading from the start learns every template's latest state."""

    event_type: ClassVar[str] = "template_changed"

    event_id: str
    template_id: str
    channel: Channel
    version: int
    deleted: bool = False
    # Newest wins (a deleted and re-created template starts again at version 1).
    occurred_at: datetime

    def contract_id(self) -> str:
        return self.event_id
