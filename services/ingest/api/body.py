"""Reading a request body: size limits (413), gzip (Content-Encoding), JSON (400)."""

from __future__ import annotations

import zlib
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
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise ApiError(
            415,
            "unsupported_encoding",
            "Content-Encoding must be gzip or identity",
            errors=[field_error("Content-Encoding", "enum", "gzip or identity")],
        )
    return gunzip(body, limit, what)


def gunzip(body: bytes, limit: int, what: str) -> bytes:
    # Bounded: a small gzip bomb must not become gigabytes in memory.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(
            400,
            "invalid_gzip",
            "the body is not valid gzip",
            errors=[field_error("body", "gzip_invalid", str(exc))],
        ) from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise too_large(what, limit)
    return out


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
