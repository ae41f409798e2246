"""The AsyncAPI 3.0 document of CLM's topics, generated from the contract models.

    python -m shared.contracts.asyncapi > docs/asyncapi.json

A test checks the committed document is what the models say, so it cannot drift.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from shared.contracts.headers import Headers
from shared.contracts.topics import TOPICS


def _header_schema() -> dict[str, Any]:
    names = {k: v for k, v in vars(Headers).items() if k.isupper()}
    return {
        "type": "object",
        "properties": {value: {"type": "string", "description": key.lower()} for key, value in names.items()},
        "required": [Headers.EVENT_ID, Headers.EVENT_TYPE, Headers.SCHEMA_VERSION, Headers.CORRELATION_ID],
    }


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
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/ClmHeaders"},
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            "bindings": {"kafka": {"key": {"type": "string", "description": spec.key}}},
        }
        channel_id = spec.name.replace(".", "_").replace("-", "_")
        channels[channel_id] = {
            "address": spec.name,
            "description": f"{spec.description} Key: {spec.key}. Dead letters: {spec.dead_letter}.",
            "messages": {model.__name__: {"$ref": f"#/components/messages/{model.__name__}"}},
        }
        operations[f"publish_{channel_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Produced by {spec.owner}.",
        }
    schemas["ClmHeaders"] = _header_schema()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "CLM topics",
            "version": "1.0.0",
            "description": "Kafka topics between CLM's services. Values are JSON; headers are UTF-8 strings.",
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
