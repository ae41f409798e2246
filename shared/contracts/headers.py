"""Kafka header names of CLM messages (values are UTF-8 strings): those every message carries, the one
only ingest's events carry, and those only dead-letter records carry."""

from __future__ import annotations


class Headers:
    # Unique id of this message; consumers' inbox tables dedupe on it.
    EVENT_ID = "clm-event-id"
    EVENT_TYPE = "clm-event-type"
    SCHEMA_VERSION = "clm-schema-version"
    # The id of the message that started the chain: ingest's event id, passed on by every hop to what
    # it emits because of a consumed message. A message with no consumed cause (an API call's, a
    # segmenter schedule timer's) has its own event id; rows written by SQL get one of their own (a
    # fresh id each for back-fill, segment-deletion and resync announcements, the republish job's id
    # for profile snapshots); a journey's timer steps continue their instance's chain.
    CORRELATION_ID = "clm-correlation-id"
    PRODUCER = "clm-producer"
    # Epoch milliseconds at which this hop produced the message.
    PRODUCED_AT_MS = "clm-produced-at-ms"
    # Only on ingest's events on clm.events.v1 (later hops do not carry it): epoch milliseconds at which
    # ingest accepted the event, for per-hop latency in benchmarks.
    ORIGIN_AT_MS = "clm-origin-at-ms"
    # Dead-letter records only (`<topic>.dlq`): why and where a message failed. A consumer's record
    # keeps the original's headers and adds these.
    DLQ_ERROR = "clm-dlq-error"
    DLQ_SOURCE = "clm-dlq-source"
    DLQ_GROUP = "clm-dlq-group"
    DLQ_ATTEMPTS = "clm-dlq-attempts"
    # On a dead-letter record sent without the original value (too large with the error headers, or a
    # record the client could not parse): the value's size and why. The value is still in the source
    # topic (`clm-dlq-source`) while retained.
    DLQ_VALUE_DROPPED = "clm-dlq-value-dropped"


# What each header holds, for the AsyncAPI document (`shared.contracts.asyncapi`).
DESCRIPTIONS: dict[str, str] = {
    Headers.EVENT_ID: "Unique id of this message; consumers' inboxes dedupe on it.",
    Headers.EVENT_TYPE: "The payload's type (the message's name).",
    Headers.SCHEMA_VERSION: "The payload schema's version within the topic.",
    Headers.CORRELATION_ID: "The id of the message that started the chain, passed on by each hop to what "
    "it emits because of a consumed message; a message with no consumed cause starts a chain.",
    Headers.PRODUCER: "The service that produced the message.",
    Headers.PRODUCED_AT_MS: "Epoch milliseconds at which this hop produced the message.",
    Headers.ORIGIN_AT_MS: "Only on ingest's events (clm.events.v1): epoch milliseconds at which ingest "
    "accepted the event. Later hops do not carry it.",
    Headers.DLQ_ERROR: "Dead-letter records only: why the message failed (at most 2,000 characters).",
    Headers.DLQ_SOURCE: "Dead-letter records only: where the message came from: `topic/partition/offset` "
    "(the notifier's given-up sends: `notifier.send_ledger`).",
    Headers.DLQ_GROUP: "Dead-letter records only: the consumer group that gave up (the notifier's given-up "
    "sends: its delivery worker, `<prefix>clm.notifier.delivery`, not a real group).",
    Headers.DLQ_ATTEMPTS: "Dead-letter records only: how many times it was tried (0: it could not be "
    "decoded, or not parsed at all).",
    Headers.DLQ_VALUE_DROPPED: "Dead-letter records only, when the value was left out (too large, or the "
    "record could not be parsed): its size and why; read it from the source topic while retained.",
}
