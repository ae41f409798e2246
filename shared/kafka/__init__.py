"""Kafka plumbing: an idempotent producer, topic creation, a batch consumer runner with a DLQ, and
the options every client connects with (TLS, SASL)."""

from shared.kafka.admin import ensure_topics
from shared.kafka.connection import client_options
from shared.kafka.consumer import Consumed, ConsumerRunner, DecodeError
from shared.kafka.producer import EventProducer, OutgoingMessage, encode_message

__all__ = [
    "Consumed",
    "ConsumerRunner",
    "DecodeError",
    "EventProducer",
    "OutgoingMessage",
    "client_options",
    "encode_message",
    "ensure_topics",
]
