"""Bulk backfill: `POST /v1/import`, an NDJSON body (one Segment call per line, gzip allowed) streamed in,
progress streamed out. A JSON body (`Content-Type: application/json`) is a Segment batch instead,
answered as `/v1/batch` answers it: Segment's own `/v1/import` is a batch endpoint, and
analytics-android v4 posts its batches there (read as NDJSON, they would be refused line by line
under a 200, and the SDK would drop them). Both accept a write key or the admin token.

Each line gets the same validation and dedupe as the tracking API; imported events keep their
historical time (so `timestamp` or `originalTimestamp` is required), are marked `source="backfill"`,
and a line without a messageId gets one derived from its content, so importing a file again within
the dedupe window publishes nothing twice (later, the consumers' inboxes drop the copies while they
keep the ids). The answer (NDJSON) is a progress line about every second, then one summary line:
`{"type": "summary", "complete": true, "accepted": ..., "duplicates": ..., "rejected": ..., "errors": [...]}`.
A summary with `"complete": false` says where it stopped (`resumeFromLine`); importing the file again
is safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.ingest.api.body import GzipStream, is_gzip
from services.ingest.api.intake import Intake
from services.ingest.api.tracking import handle_batch
from services.ingest.domain.normalize import BACKFILL_SOURCE, content_message_id, to_customer_event
from services.ingest.domain.validation import FieldError, TextHints, validate_call
from services.ingest.domain.write_keys import key_from_authorization
from services.ingest.event_writer import Overloaded, PreparedEvent, Unavailable
from shared.http import ApiError, is_admin

_MAX_OVERLOAD_RETRIES = 30


class _DuplexStreamingResponse(StreamingResponse):
    """Streams while the request body is still being read: Starlette's StreamingResponse would read
    `receive` itself (to notice a disconnect) and steal the body from the endpoint. `first` is the
    line already taken from `lines` (the answer starts with it)."""

    def __init__(self, first: bytes, lines: AsyncGenerator[bytes, None]) -> None:
        async def answer() -> AsyncIterator[bytes]:
            yield first
            async for out in lines:
                yield out

        super().__init__(answer(), media_type="application/x-ndjson")
        self._lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        finally:  # also when the client went away: the import ends (and frees its slot) now
            await self._lines.aclose()


@dataclass
class ImportProgress:
    lines: int = 0
    accepted: int = 0
    published: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def line(self, kind: str, **extra: Any) -> bytes:
        body: dict[str, Any] = {
            "type": kind,
            "lines": self.lines,
            "accepted": self.accepted,
            "published": self.published,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }
        body.update(extra)
        return orjson.dumps(body) + b"\n"


# A UTF-8 byte order mark, which some exporters (Excel, PowerShell, .NET) write at the start of a
# file: no part of the first line's JSON.
_BOM = b"\xef\xbb\xbf"


async def ndjson_lines(
    chunks: AsyncIterator[bytes], max_line: int
) -> AsyncIterator[tuple[int, bytes | None]]:
    """(line number, line) for each line; None for a line longer than `max_line` (skipped, not buffered)."""
    buffer = bytearray()
    number = 0
    oversized = False
    async for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > max_line:
                    oversized = True
                    buffer.clear()
                break
            number += 1
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if number == 1:
                line = line.removeprefix(_BOM)
            too_long = oversized or len(line) > max_line
            oversized = False
            yield number, None if too_long else line
    if number == 0:
        buffer = bytearray(bytes(buffer).removeprefix(_BOM))
    if buffer.strip() or oversized:
        yield number + 1, None if oversized or len(buffer) > max_line else bytes(buffer)


async def decoded_body(request: Request, gzip: GzipStream | None) -> AsyncIterator[bytes]:
    """The body as it arrives, inflated in bounded pieces when gzip (raises `ApiError` for bad gzip)."""
    async for chunk in request.stream():
        if gzip is None:
            if chunk:
                yield chunk
        else:
            for piece in gzip.feed(chunk):
                yield piece
    if gzip is not None:
        gzip.finish()


def imports_router(intake: Intake) -> APIRouter:
    router = APIRouter(tags=["backfill"])
    settings = intake.settings
    active = 0

    async def authorize(request: Request) -> None:
        header = request.headers.get("authorization")
        if is_admin(header, settings.admin_token.get_secret_value()):
            return
        await intake.source_of(key_from_authorization(header))

    @router.post(
        "/v1/import",
        summary="Bulk backfill: NDJSON in, NDJSON progress out (a JSON body is a Segment batch)",
    )
    async def import_events(request: Request) -> Response:
        nonlocal active
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type == "application/json":
            # An import like any other: the admin token may send it (its events are a backfill's).
            if is_admin(request.headers.get("authorization"), settings.admin_token.get_secret_value()):
                return await handle_batch(intake, request, BACKFILL_SOURCE)
            return await handle_batch(intake, request, await intake.header_source(request))
        await authorize(request)
        if active >= settings.max_concurrent_imports:
            raise ApiError(
                429,
                "overloaded",
                "too many imports running; retry later",
                headers={"Retry-After": str(settings.overload_retry_after_s * 10)},
            )
        gzip = (
            GzipStream(settings.import_max_gzip_ratio, settings.max_batch_bytes) if is_gzip(request) else None
        )
        active += 1

        async def run() -> AsyncGenerator[bytes, None]:
            nonlocal active
            try:
                async for out in _import(intake, decoded_body(request, gzip)):
                    yield out
            finally:
                active -= 1

        # No status is sent before the import's first line: until then a refusal (bad gzip, a
        # bomb) is a plain 4xx, not a 200 followed by a dropped connection.
        lines = run()
        try:
            first = await anext(lines)
        except StopAsyncIteration:  # _import always ends with a summary
            raise RuntimeError("the import answered nothing") from None
        return _DuplexStreamingResponse(first, lines)

    return router


async def _import(intake: Intake, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The import's answer lines. An `ApiError` from reading the body (bad gzip, a bomb) is raised
    while nothing is published or answered yet (the endpoint answers it as such); after that it ends
    the import with an incomplete summary: the events before `resumeFromLine` are durable."""
    settings = intake.settings
    progress = ImportProgress()
    chunk: list[PreparedEvent] = []
    chunk_start = 1
    last_report = time.monotonic()
    started = False  # something was published or answered: a refusal can no longer be a 4xx

    def reject(number: int, errors: list[FieldError]) -> None:
        progress.rejected += 1
        room = settings.import_max_reported_errors - len(progress.errors)
        progress.errors.extend({"line": number, **e.as_json()} for e in errors[: max(0, room)])

    async def flush() -> str | None:
        """Write the chunk; the reason it could not be written, if so."""
        for _ in range(_MAX_OVERLOAD_RETRIES):
            try:
                outcome = await intake.writer.write(chunk)
            except Overloaded:
                await asyncio.sleep(settings.overload_retry_after_s)
                continue
            except Unavailable:
                return "unavailable"
            progress.accepted += len(chunk)
            progress.published += len(outcome.published)
            progress.duplicates += len(outcome.duplicates)
            chunk.clear()
            return None
        return "overloaded"

    try:
        async for number, line in ndjson_lines(body, settings.max_event_bytes):
            progress.lines = number
            if not chunk:
                chunk_start = number
            if line is None:
                reject(
                    number,
                    [FieldError("line", "max_size", f"an event is at most {settings.max_event_bytes} bytes")],
                )
            elif line.strip():
                prepared = _prepare(intake, line)
                if isinstance(prepared, list):
                    reject(number, prepared)
                else:
                    chunk.append(prepared)
            if len(chunk) >= settings.import_chunk_events:
                started = True
                failure = await flush()
                if failure is not None:
                    yield progress.line(
                        "summary",
                        complete=False,
                        error=failure,
                        resumeFromLine=chunk_start,
                        errors=progress.errors,
                    )
                    return
            if time.monotonic() - last_report >= settings.import_progress_interval_s:
                last_report = time.monotonic()
                started = True
                yield progress.line("progress")
    except ApiError as exc:
        if not started:
            raise
        # The lines read so far but not yet written are not published: the import resumes there.
        yield progress.line(
            "summary",
            complete=False,
            error=exc.code,
            message=exc.message,
            resumeFromLine=chunk_start if chunk else progress.lines + 1,
            errors=[*progress.errors, *exc.errors],
        )
        return
    if chunk:
        failure = await flush()
        if failure is not None:
            yield progress.line(
                "summary", complete=False, error=failure, resumeFromLine=chunk_start, errors=progress.errors
            )
            return
    yield progress.line("summary", complete=True, errors=progress.errors)


def _prepare(intake: Intake, line: bytes) -> PreparedEvent | list[FieldError]:
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return [FieldError("line", "json_invalid", str(exc))]
    valid = validate_call(raw, None, hints=TextHints.of(line))
    if isinstance(valid, list):
        return valid
    if valid.call.timestamp is None and valid.call.original_timestamp is None:
        return [
            FieldError(
                "timestamp", "required", "an imported event keeps its historical time: timestamp is required"
            )
        ]
    event = to_customer_event(
        valid,
        received_at=intake.clock.now(),
        source=BACKFILL_SOURCE,
        correct_skew=False,
        message_id=lambda: content_message_id(line),
    )
    return intake.prepare(event, "line")
