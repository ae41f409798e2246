"""Kafka header names every CLM message carries (values are UTF-8 strings)."""

from __future__ import annotations


class Headers:
    # Unique id of this message; consumers' inbox tables dedupe on it.
    EVENT_ID = "clm-event-id"
    EVENT_TYPE = "clm-event-type"
    SCHEMA_VERSION = "clm-schema-version"
    # The id of the message that started the chain: ingest's event id, passed on by every hop to what
    # it emits because of a consumed message; a message with no consumed cause has its own event id.
    CORRELATION_ID = "clm-correlation-id"
    PRODUCER = "clm-producer"
    # Epoch milliseconds at which this hop produced the message.
    PRODUCED_AT_MS = "clm-produced-at-ms"
    # Epoch milliseconds at which ingest accepted the original event: per-hop latency in benchmarks.
    ORIGIN_AT_MS = "clm-origin-at-ms"
    # Dead-letter headers: why and where a message failed.
    DLQ_ERROR = "clm-dlq-error"
    DLQ_SOURCE = "clm-dlq-source"
    DLQ_GROUP = "clm-dlq-group"
    DLQ_ATTEMPTS = "clm-dlq-attempts"
