"""The AsyncAPI 3.0 document of CLM's topics, generated from the contract models.

    python -m shared.contracts.asyncapi > docs/asyncapi.json

A test checks the committed document is what the models say, so it cannot drift.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from shared.contracts.headers import DESCRIPTIONS, Headers
from shared.contracts.topics import TOPICS, TopicSpec

_INFO = (
    "Kafka topics between CLM's services. Values are JSON; headers are UTF-8 strings. Topic names and "
    "consumer groups are prefixed by CLM_TOPIC_PREFIX when set (empty by default). Topics are created on "
    "start with CLM_TOPIC_PARTITIONS partitions (8; CLM_TOPIC_PARTITION_OVERRIDES per topic) and "
    "CLM_TOPIC_REPLICATION_FACTOR replicas (1); dead-letter topics with one partition."
)
_DLQ_HEADERS = (
    Headers.DLQ_ERROR,
    Headers.DLQ_SOURCE,
    Headers.DLQ_GROUP,
    Headers.DLQ_ATTEMPTS,
    Headers.DLQ_VALUE_DROPPED,
)


def _header_schema(names: list[str], required: list[str], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {name: {"type": "string", "description": DESCRIPTIONS[name]} for name in names},
        "required": required,
    }


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph as one line (its sentences wrap over several)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _channel_id(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def _consumed_by(spec: TopicSpec) -> str:
    return ", ".join(f"{service} (group `clm.{service}.{purpose}`)" for service, purpose in spec.consumers)


def _dead_letters(spec: TopicSpec) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The dead-letter topic of `spec`: (channel id, channel, message, send operation)."""
    channel_id = _channel_id(spec.dead_letter)
    model = spec.schema.__name__
    message = {
        "name": f"{spec.schema.event_type}_dead_letter",
        "title": f"{model} dead letter",
        "summary": f"A message of {spec.name} that a consumer gave up on, with why and where it failed.",
        "headers": {"$ref": "#/components/schemas/ClmDeadLetterHeaders"},
        "payload": {
            "description": f"The record's value as consumed, byte for byte: normally a {model}, but "
            "whatever it held when it could not be decoded; empty when `clm-dlq-value-dropped` is set."
        },
        "bindings": {
            "kafka": {
                "key": {
                    "type": "string",
                    "description": "The original record's key; none when the record could not be "
                    "parsed, or was too large for the dead-letter topic even without its value (its "
                    "own headers are then left out too).",
                }
            }
        },
    }
    description = (
        f"Dead letters of {spec.name}: written by a consumer that gave up on a message (its error, "
        "source and attempts in the headers, the original headers kept). One partition. Nothing "
        "consumes it: an operator reads it."
    )
    if spec.dead_letter_writers:
        description += f" {spec.dead_letter_writers}"
    channel = {
        "address": spec.dead_letter,
        "description": description,
        "messages": {f"{model}DeadLetter": {"$ref": f"#/components/messages/{model}DeadLetter"}},
        "bindings": {"kafka": {"partitions": 1}},
    }
    writers = " and by the notifier's delivery worker" if spec.dead_letter_writers else ""
    operation = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "summary": f"Written by each consumer of {spec.name} that gives up on a message{writers}.",
    }
    return channel_id, channel, message, operation


def build() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for spec in TOPICS:
        model = spec.schema
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas[name] = definition
        schemas[model.__name__] = schema
        messages[model.__name__] = {
            "name": model.event_type,
            "title": model.__name__,
            "summary": _summary(model.__doc__),
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/ClmHeaders"},
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            "bindings": {"kafka": {"key": {"type": "string", "description": spec.key}}},
        }
        channel_id = _channel_id(spec.name)
        channels[channel_id] = {
            "address": spec.name,
            "description": f"{spec.description} Key: {spec.key}. Dead letters: {spec.dead_letter}.",
            "messages": {model.__name__: {"$ref": f"#/components/messages/{model.__name__}"}},
        }
        if spec.config:
            channels[channel_id]["bindings"] = {
                "kafka": {
                    "topicConfiguration": {
                        k: [v] if k == "cleanup.policy" else v for k, v in spec.config.items()
                    }
                }
            }
        operations[f"publish_{channel_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Produced by {spec.owner}.",
        }
        operations[f"consume_{channel_id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Consumed by {_consumed_by(spec)}.",
        }
        dlq_id, channels[dlq_id], messages[f"{model.__name__}DeadLetter"], publish = _dead_letters(spec)
        operations[f"publish_{dlq_id}"] = publish
    names = [v for k, v in vars(Headers).items() if k.isupper()]
    chain = [n for n in names if n not in _DLQ_HEADERS]
    schemas["ClmHeaders"] = _header_schema(
        chain,
        [Headers.EVENT_ID, Headers.EVENT_TYPE, Headers.SCHEMA_VERSION, Headers.CORRELATION_ID],
        "Headers of CLM's messages (clm-origin-at-ms: ingest's events only).",
    )
    schemas["ClmDeadLetterHeaders"] = _header_schema(
        [*chain, *_DLQ_HEADERS],
        [Headers.DLQ_ERROR, Headers.DLQ_SOURCE, Headers.DLQ_GROUP, Headers.DLQ_ATTEMPTS],
        "Headers of a dead-letter record: the original record's (when it had them and they fit) and the "
        "dead-letter ones.",
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "CLM topics",
            "version": "1.0.0",
            "description": _INFO,
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render() -> str:
    return orjson.dumps(build(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
