"""Reading a request body: size limits (413), gzip (Content-Encoding), JSON (400)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import Request

from shared.http import ApiError, field_error


def too_large(what: str, limit: int, field: str = "body") -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"{what} is larger than {limit // 1024} KB",
        errors=[field_error(field, "max_size", f"at most {limit} bytes")],
    )


async def read_body(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The body, decompressed; 413 past `limit` bytes (compressed or not), 400/415 for bad encodings."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(what, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(what, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    return gunzip(body, limit, what) if is_gzip(request) else body


def is_gzip(request: Request) -> bool:
    """Whether the body is gzip (`Content-Encoding`); 415 for an encoding other than gzip/identity."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return False
    if encoding != "gzip":
        raise ApiError(
            415,
            "unsupported_encoding",
            "Content-Encoding must be gzip or identity",
            errors=[field_error("Content-Encoding", "enum", "gzip or identity")],
        )
    return True


def invalid_gzip(reason: str) -> ApiError:
    return ApiError(
        400,
        "invalid_gzip",
        "the body is not valid gzip",
        errors=[field_error("body", "gzip_invalid", reason)],
    )


def gunzip(body: bytes, limit: int, what: str) -> bytes:
    """A whole gzip body, inflated to at most `limit` bytes (a small gzip bomb must not become
    gigabytes in memory), read as an import's stream is (`GzipStream`): every concatenated member,
    and a 400 for a body cut short or followed by anything but another member."""
    stream = GzipStream(max_ratio=None)
    out = bytearray()
    for piece in stream.feed(body):
        out += piece
        if len(out) > limit:
            raise too_large(what, limit)
    stream.finish()
    return bytes(out)


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400,
            "invalid_json",
            "the body is not valid JSON",
            errors=[field_error("body", "json_invalid", str(exc))],
        ) from exc


class GzipStream:
    """Inflates a gzip body that arrives in chunks and has no size limit (an import), in pieces of at
    most `piece` bytes, so memory stays bounded whatever the ratio. A body may not inflate past
    `max_ratio` times the compressed bytes read (plus `allowance`): real NDJSON inflates 5-30x, a
    gzip bomb ~1,000x, and each inflated byte costs parsing time (None: no ratio, the caller bounds
    the output). Concatenated members (`cat a.gz
    b.gz`) are read in turn, as gzip itself reads them; anything else after a member is refused.
    Raises `ApiError`: 400 `invalid_gzip`, 413 `payload_too_large`."""

    def __init__(self, max_ratio: int | None, allowance: int = 0, piece: int = 64 * 1024) -> None:
        self._max_ratio = max_ratio
        self._allowance = allowance
        self._piece = piece
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in_member = False
        self._members = 0  # ended so far: zero padding may follow one, never start the body
        self.read = 0  # compressed bytes consumed
        self.inflated = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The inflated pieces of the next chunk of the body."""
        while True:
            if not self._in_member:
                if self._members:
                    data = data.lstrip(b"\0")  # zero padding after a member, as gzip allows
                if not data:
                    return
                self._in_member = True
            try:
                out = self._inflater.decompress(data, self._piece)
            except zlib.error as exc:
                raise invalid_gzip(str(exc)) from exc
            rest = self._inflater.unconsumed_tail
            self.read += len(data) - len(rest) - len(self._inflater.unused_data)
            self.inflated += len(out)
            if self._max_ratio is not None and self.inflated > self._max_ratio * self.read + self._allowance:
                raise ApiError(
                    413,
                    "payload_too_large",
                    f"the gzip body inflates more than {self._max_ratio} times (a gzip bomb?)",
                    errors=[field_error("body", "max_ratio", f"gzip may inflate at most {self._max_ratio}x")],
                )
            if out:
                yield out
            if self._inflater.eof:
                self._members += 1
                data = self._inflater.unused_data
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._in_member = False
            elif rest or len(out) == self._piece:  # more input, or output still held back
                data = rest
            else:
                return

    def finish(self) -> None:
        """At the end of the body: 400 if it stopped inside a gzip member."""
        if self._in_member:
            raise invalid_gzip("the gzip stream ends before its end marker (truncated)")
