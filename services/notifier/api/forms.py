"""URL-encoded form bodies (Twilio webhooks, the preference page) without python-multipart."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from shared.http import ApiError

MAX_FORM_BYTES = 64 * 1024


def _too_large() -> ApiError:
    return ApiError(413, "too_large", "form body too large")


async def read_form(request: Request) -> list[tuple[str, str]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Capped while it is read: these endpoints are public (a Twilio signature is checked on the form
    # read here), and reading the whole body before measuring it buffered any size anyone sent.
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise _too_large()
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return []
    if content_type not in ("application/x-www-form-urlencoded", ""):
        raise ApiError(415, "unsupported_media_type", "send application/x-www-form-urlencoded")
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", "malformed form body") from exc
