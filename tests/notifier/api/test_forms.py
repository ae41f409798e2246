"""Form bodies of the public endpoints (Twilio webhooks, the preference page): size-capped as they are
read, not after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from services.notifier.api.forms import MAX_FORM_BYTES

CHUNK = b"a" * 65536


async def test_an_oversized_form_is_refused_before_it_is_read_whole(
    start_notifier: Callable[..., Any],
) -> None:
    """The whole body was read into memory and only then refused (413): anyone could make the
    notifier buffer a body of any size on these unauthenticated endpoints (the Twilio signature is
    checked after the form is read)."""
    async with start_notifier() as h:
        pulled = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal pulled
            for _ in range(256):  # 16 MiB at most
                pulled += 1
                yield CHUNK

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        r = await h.client.post("/v1/inbound/twilio/sms", content=body(), headers=form)
        assert r.status_code == 413, r.text
        assert pulled * len(CHUNK) <= MAX_FORM_BYTES + 2 * len(CHUNK), pulled

        # A declared length past the cap is refused without reading anything.
        pulled = 0
        r = await h.client.post(
            "/v1/inbound/twilio/sms",
            content=body(),
            headers={**form, "Content-Length": str(256 * len(CHUNK))},
        )
        assert r.status_code == 413, r.text
        assert pulled <= 1, pulled
