"""Signed tokens for links in messages: unsubscribe, preference page, tracking pixel and clicks, inbox.

A token is `base64url(json payload) + "." + base64url(HMAC-SHA256(secret, purpose + payload))`: the
purpose is part of the MAC, so a click token can never be replayed as an unsubscribe token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import quote

import orjson


class InvalidToken(Exception):
    pass


def _same(supplied: str, expected: str) -> bool:
    """Constant-time, and for any text a client sends (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(supplied.encode("utf-8", "surrogatepass"), expected.encode())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, purpose: str, body: str) -> str:
        message = f"{purpose}:{body}".encode("utf-8", "surrogatepass")
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest()[:20])

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        return f"{body}.{self._mac(purpose, body)}"

    def verify(self, purpose: str, token: str) -> dict[str, Any]:
        body, _, mac = token.partition(".")
        if not body or not mac or not _same(mac, self._mac(purpose, body)):
            raise InvalidToken("bad signature")
        try:
            payload = orjson.loads(_unb64(body))
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise InvalidToken("malformed token") from exc
        if not isinstance(payload, dict):
            raise InvalidToken("malformed token")
        return payload


# Where a template preview's unsubscribe link points: a page that changes nothing.
PREVIEW_UNSUBSCRIBE_PATH = "/u/preview"


class MessageLinks:
    """The URLs a message carries, all signed, all pointing at the notifier's public base URL."""

    UNSUBSCRIBE = "unsubscribe"
    OPEN = "open"
    CLICK = "click"
    INBOX = "inbox"

    def __init__(self, signer: LinkSigner, base_url: str) -> None:
        self.signer = signer
        self.base_url = base_url.rstrip("/")

    def unsubscribe_token(
        self, customer_id: str, channel: str, topic: str | None, message_id: str | None
    ) -> str:
        return self.signer.sign(
            self.UNSUBSCRIBE, {"c": customer_id, "ch": channel, "t": topic, "m": message_id}
        )

    def unsubscribe_url(
        self, customer_id: str, channel: str, topic: str | None, message_id: str | None
    ) -> str:
        return f"{self.base_url}/u/{self.unsubscribe_token(customer_id, channel, topic, message_id)}"

    def open_pixel_url(self, message_id: str) -> str:
        return f"{self.base_url}/t/o/{self.signer.sign(self.OPEN, {'m': message_id})}.gif"

    def click_url(self, message_id: str, target: str) -> str:
        token = self.signer.sign(self.CLICK, {"m": message_id, "u": target})
        return f"{self.base_url}/t/c/{token}"

    def inbox_token(self, customer_id: str) -> str:
        return self.signer.sign(self.INBOX, {"c": customer_id})

    def is_own(self, url: str) -> bool:
        return url.startswith(self.base_url + "/")


def quote_path(value: str) -> str:
    return quote(value, safe="")
