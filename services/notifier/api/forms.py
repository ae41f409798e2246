"""URL-encoded form bodies (Twilio webhooks, the preference page) without python-multipart."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from shared.http import ApiError

MAX_FORM_BYTES = 64 * 1024


async def read_form(request: Request) -> list[tuple[str, str]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if not body:
        return []
    if content_type not in ("application/x-www-form-urlencoded", ""):
        raise ApiError(415, "unsupported_media_type", "send application/x-www-form-urlencoded")
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", "form body too large")
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", "malformed form body") from exc
