"""May this message go to this customer on this channel? Decided at send time.

Transactional messages are exempt. Marketing messages need: no channel-wide opt-out (the `*` topic:
"unsubscribe from all", SMS STOP), and for their subscription topic either an explicit opt-in or,
with no recorded choice, a topic whose default is subscribed (opt-out model). A marketing SMS also
needs its number not to have sent STOP (`sms_address_optouts`, keyed by `phone_key`): a STOP stops
marketing SMS to the number whoever CLM thinks owns it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.contracts import Channel, MessageCategory

ALL_TOPICS = "*"


@dataclass(frozen=True)
class SubscriptionTopic:
    id: str
    name: str
    channels: tuple[str, ...]
    # True: subscribed unless the customer opts out; False: only after an explicit opt-in.
    default_subscribed: bool


@dataclass(frozen=True)
class ConsentDecision:
    allowed: bool
    reason: str | None = None


SMS_NUMBER_OPTED_OUT = "the number opted out of sms marketing (STOP)"
EMAIL_ADDRESS_OPTED_OUT = "the address opted out of email marketing (a spam complaint)"


def phone_key(salt: str, e164: str) -> str:
    """The key of a number in `sms_address_optouts`: the salted hash of its E.164 form
    (`domain.phone_numbers`), as erasure tombstones hash identifiers, never the number itself. Keys
    written before numbers were read as E.164 (the digits with the leading `+`) are the same for
    every number written with its `+`, which Twilio's `From` always is."""
    return hmac.new(salt.encode(), e164.encode(), hashlib.sha256).hexdigest()


def decide(
    category: MessageCategory,
    channel: Channel,
    topic_id: str | None,
    topic: SubscriptionTopic | None,
    choices: Mapping[tuple[str, str], bool],
) -> ConsentDecision:
    """`choices` maps (topic id or `*`, channel) to the customer's recorded choice."""
    if category is MessageCategory.TRANSACTIONAL:
        return ConsentDecision(True)
    if choices.get((ALL_TOPICS, channel.value)) is False:
        return ConsentDecision(False, f"unsubscribed from all {channel.value} marketing")
    if topic_id is None:
        return ConsentDecision(True)
    if topic is None:
        return ConsentDecision(False, f"unknown subscription topic {topic_id!r}")
    if channel.value not in topic.channels:
        return ConsentDecision(False, f"topic {topic_id!r} is not offered on {channel.value}")
    choice = choices.get((topic_id, channel.value))
    if choice is None:
        choice = topic.default_subscribed
        if not choice:
            return ConsentDecision(False, f"not opted in to {topic_id!r} on {channel.value}")
    if not choice:
        return ConsentDecision(False, f"unsubscribed from {topic_id!r} on {channel.value}")
    return ConsentDecision(True)


def opted_out(
    topics: Iterable[SubscriptionTopic],
    channel: Channel,
    before: Mapping[tuple[str, str], bool],
    after: Mapping[tuple[str, str], bool],
) -> list[str]:
    """The ids of `topics` whose marketing on `channel` reached the customer under the choices
    `before` and no longer does `after`, as `decide` judges it at send time: what a change of choices
    opted the customer out of. Unticking an opt-in topic never joined, or a topic already off through
    "unsubscribe from all", opts out of nothing."""

    def receives(topic: SubscriptionTopic, choices: Mapping[tuple[str, str], bool]) -> bool:
        return decide(MessageCategory.MARKETING, channel, topic.id, topic, choices).allowed

    return [t.id for t in topics if receives(t, before) and not receives(t, after)]
