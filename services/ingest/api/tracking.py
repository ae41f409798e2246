"""Segment's HTTP Tracking API: /v1/identify, track, page, screen, group, alias and batch.

Answers as Segment does (`200 {"success": true}`), except that an invalid event gets a 400 naming the
field and the rule instead of a silent 200; a batch accepts its valid items and says which failed.
The SDKs' own paths lead to the same handlers: analytics.js posts single calls to `/v1/t`, `/v1/i`,
`/v1/p`, `/v1/s`, `/v1/g`, `/v1/a` (text/plain, the write key in the body) and batches to `/v1/b`,
as analytics-kotlin and analytics-swift do; analytics-android v4 posts batches to `/v1/import`
(see `api/imports.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from services.ingest.api.body import parse_json, read_body
from services.ingest.api.intake import Intake, invalid
from services.ingest.domain.normalize import apply_batch_defaults, to_customer_event
from services.ingest.domain.validation import FieldError, TextHints, validate_call
from services.ingest.event_writer import PreparedEvent, WriteOutcome
from shared.contracts import storable
from shared.contracts.events import EventType
from shared.http import ApiError, field_error

_SUCCESS = b'{"success":true}'
_DATETIME = TypeAdapter(datetime)
# The SDKs' short paths: the call type's first letter (`/v1/t` is a track call), and `/v1/b` a batch.
SHORT_PATHS = {call_type: call_type.value[0] for call_type in EventType}
BatchHandler = Callable[[Request], Awaitable[Response]]


def tracking_router(intake: Intake, batch: BatchHandler) -> APIRouter:
    router = APIRouter(tags=["tracking"])
    settings = intake.settings

    def single(call_type: EventType) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            source = await intake.header_source(request)
            body = await read_body(request, settings.max_event_bytes, "an event")
            raw = parse_json(body)
            if source is None:
                source = await intake.source_of(raw.get("writeKey") if isinstance(raw, dict) else None)
            valid = validate_call(raw, call_type, hints=TextHints.of(body))
            if isinstance(valid, list):
                raise invalid(valid)
            event = to_customer_event(valid, received_at=intake.clock.now(), source=source)
            prepared = intake.prepare(event, "body")
            if isinstance(prepared, list):
                raise invalid(prepared)
            await intake.write([prepared])
            return Response(_SUCCESS, media_type="application/json")

        handle.__name__ = f"post_{call_type.value}"
        return handle

    for call_type in EventType:
        handler = single(call_type)
        router.add_api_route(
            f"/v1/{call_type.value}", handler, methods=["POST"], summary=f"Segment {call_type.value} call"
        )
        router.add_api_route(
            f"/v1/{SHORT_PATHS[call_type]}", handler, methods=["POST"], include_in_schema=False
        )

    router.add_api_route("/v1/batch", batch, methods=["POST"], summary="Segment batch: up to 500 KB of calls")
    router.add_api_route("/v1/b", batch, methods=["POST"], include_in_schema=False)
    return router


def batch_handler(intake: Intake) -> BatchHandler:
    """A batch call (`{"batch": [...]}`): its valid calls are accepted, the others named."""

    async def post_batch(request: Request) -> Response:
        return await handle_batch(intake, request, await intake.header_source(request))

    return post_batch


async def handle_batch(intake: Intake, request: Request, source: str | None) -> Response:
    """Answer a batch call sent by `source` (None: the one the `writeKey` in its body names)."""
    settings = intake.settings
    text = await read_body(request, settings.max_batch_bytes, "a batch")
    raw = parse_json(text)
    may_hold_nul = storable.NUL_ESCAPE in text  # searched once, not per call
    if not isinstance(raw, dict):
        raise ApiError(
            400,
            "invalid_batch",
            "a batch is a JSON object",
            errors=[field_error("body", "object_type", 'expected {"batch": [...]}')],
        )
    if source is None:
        source = await intake.source_of(raw.get("writeKey"))
    items = raw.get("batch")
    if not isinstance(items, list):
        rule = "missing" if items is None else "list_type"
        raise ApiError(
            400,
            "invalid_batch",
            "the batch needs a list of calls",
            errors=[field_error("batch", rule, "batch must be a list of calls")],
        )
    # Batch-level context and integrations go into every call: an object there as here (ignoring
    # one that is not would publish the batch without what its sender meant every call to carry).
    wrong = [name for name in ("context", "integrations") if not isinstance(raw.get(name), dict | None)]
    if wrong:
        raise ApiError(
            400,
            "invalid_batch",
            "the batch's " + " and ".join(wrong) + " must be JSON objects",
            errors=[field_error(name, "dict_type", f"{name} must be a JSON object") for name in wrong],
        )
    # As deep there as here.
    deep = storable.too_deep_path({k: raw[k] for k in ("context", "integrations") if k in raw})
    if deep is not None:
        raise ApiError(
            400,
            "invalid_batch",
            "the batch is nested too deep",
            errors=[field_error(deep, storable.DEPTH_RULE, storable.DEPTH_MESSAGE)],
        )
    sent_at = _batch_sent_at(raw.get("sentAt"))
    received_at = intake.clock.now()
    accepted: list[int] = []
    prepared: list[PreparedEvent] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        prefix = f"batch.{index}"
        # Measured with the batch's context and integrations it takes: each event is at most
        # `max_event_bytes` however its batch was written.
        call = apply_batch_defaults(item, raw) if isinstance(item, dict) else item
        encoded = _encoded(call)
        if encoded is not None and len(encoded) > settings.max_event_bytes:
            errors = [
                FieldError(
                    prefix,
                    "max_size",
                    f"an event is at most {settings.max_event_bytes} bytes, with the batch's "
                    "context and integrations",
                )
            ]
        else:
            # Its JSON says whether it may be nested too deep (None: past orjson's limit, so it
            # is); the batch-level defaults were checked above.
            deep_hint = encoded is None or storable.may_be_too_deep(encoded)
            valid = validate_call(call, prefix=prefix, hints=TextHints(may_hold_nul, deep_hint))
            if not isinstance(valid, list):
                event = to_customer_event(
                    valid, received_at=received_at, source=source, batch_sent_at=sent_at
                )
                ready = intake.prepare(event, prefix)
                if not isinstance(ready, list):
                    prepared.append(ready)
                    accepted.append(index)
                    continue
                valid = ready
            errors = valid
        rejected.append(
            {"index": index, "messageId": _echoed_id(item), "errors": [e.as_json() for e in errors]}
        )
    outcome = await intake.write(prepared) if prepared else WriteOutcome([], [])
    if not rejected:
        return JSONResponse(
            {"success": True, "accepted": len(accepted), "duplicates": len(outcome.duplicates)}
        )
    body: dict[str, Any] = {
        "success": False,
        "error": "partially_rejected" if accepted else "invalid_batch",
        "message": f"{len(rejected)} of {len(items)} calls rejected"
        + ("; the others were accepted" if accepted else "; nothing was accepted"),
        "accepted": len(accepted),
        "duplicates": len(outcome.duplicates),
        "acceptedIndexes": accepted,
        "rejected": rejected,
        "errors": [e for r in rejected for e in r["errors"]],
    }
    return JSONResponse(body, status_code=207 if accepted else 400)


def _echoed_id(item: object) -> str | int | float | None:
    """A rejected call's messageId, as sent when it is one a client could have meant (any other
    value, e.g. a deeply nested list, is not echoed: it need not even be writable as JSON)."""
    message_id = item.get("messageId") if isinstance(item, dict) else None
    if isinstance(message_id, (str, int, float)) and not isinstance(message_id, bool):
        return message_id
    return None


def _encoded(item: object) -> bytes | None:
    """A batch item as JSON: empty when it is not an object (validation refuses it), None when it
    nests past what orjson writes."""
    if not isinstance(item, dict):
        return b""
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:
        return None


def _batch_sent_at(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        sent_at = _DATETIME.validate_python(value)
    except ValidationError as exc:
        raise ApiError(
            400,
            "invalid_batch",
            "sentAt is not a date-time",
            errors=[field_error("sentAt", exc.errors()[0]["type"], "ISO-8601 date-time")],
        ) from exc
    if not storable.time_in_range(sent_at):
        raise ApiError(
            400,
            "invalid_batch",
            "sentAt is out of range",
            errors=[field_error("sentAt", storable.TIME_RULE, f"sentAt {storable.TIME_MESSAGE}")],
        )
    return sent_at
