"""Signed links and Standard Webhooks signatures: a genuine one verifies; anything else, including
non-ASCII text from a hostile client (which `hmac.compare_digest` refuses as str), is refused cleanly."""

from __future__ import annotations

import pytest

from services.notifier.domain import standard_webhooks
from services.notifier.domain.signing import InvalidToken, LinkSigner

SECRET = "whsec_ZGV2LXdlYmhvb2stc2VjcmV0LWNoYW5nZS1tZQ=="


def test_a_signed_link_verifies_and_a_tampered_one_does_not() -> None:
    signer = LinkSigner("link-secret")
    token = signer.sign("u", {"c": "c1", "t": "news"})
    assert signer.verify("u", token) == {"c": "c1", "t": "news"}
    with pytest.raises(InvalidToken):
        signer.verify("o", token)  # another purpose
    body, _, mac = token.partition(".")
    for forged in [f"{body}.{mac[:-1]}x", f"{body}.é{mac[1:]}", f"é{body}.{mac}", "\udcff.\udcff", "", "."]:
        with pytest.raises(InvalidToken):
            signer.verify("u", forged)


def test_standard_webhooks_signatures() -> None:
    body = b'{"type":"message.sent"}'
    signed = standard_webhooks.headers(SECRET, "msg_1", 1_700_000_000, body)
    assert standard_webhooks.verify(SECRET, signed, body, now=1_700_000_100)
    assert not standard_webhooks.verify(SECRET, signed, body + b" ", now=1_700_000_100)
    assert not standard_webhooks.verify(SECRET, signed, body, now=1_700_001_000)  # too old
    hostile = {**signed, "webhook-signature": "v1,é \udcff"}
    assert not standard_webhooks.verify(SECRET, hostile, body, now=1_700_000_100)
