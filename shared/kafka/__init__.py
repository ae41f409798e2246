"""Kafka plumbing: an idempotent producer, topic creation, and a batch consumer runner with a DLQ."""

from shared.kafka.admin import ensure_topics
from shared.kafka.consumer import Consumed, ConsumerRunner, DecodeError
from shared.kafka.producer import EventProducer, OutgoingMessage, encode_message

__all__ = [
    "Consumed",
    "ConsumerRunner",
    "DecodeError",
    "EventProducer",
    "OutgoingMessage",
    "encode_message",
    "ensure_topics",
]
