"""Standard Webhooks signatures (https://www.standardwebhooks.com/): what receivers verify.

    webhook-id: <message id>            webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))>

The secret is `whsec_` + base64(key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def verify(secret: str, received: dict[str, str], body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """True when one of the (space-separated) signatures matches and the timestamp is fresh."""
    try:
        webhook_id = received["webhook-id"]
        timestamp = int(received["webhook-timestamp"])
        signatures = received["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, webhook_id, timestamp, body)
    return any(hmac.compare_digest(expected.encode(), s.encode("utf-8", "surrogatepass")) for s in signatures)
