"""Which provider answers say an address does not exist, and the one form an address is kept by."""

from __future__ import annotations

import orjson
import pytest

from services.notifier.channels.http_providers import fcm_unregistered, twilio_address_gone
from services.notifier.domain.suppression import address_form, smtp_address_gone, suppression_key
from shared.contracts import Channel


@pytest.mark.parametrize(
    ("code", "text", "gone"),
    [
        (550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown", "SMTP 550 5.1.1"),
        (550, "5.1.1 mailbox unavailable", "SMTP 550 5.1.1"),
        (553, "5.1.3 bad recipient address syntax", "SMTP 553 5.1.3"),
        (550, "5.1.2 Host unknown", "SMTP 550 5.1.2"),
        (556, "5.1.10 Recipient address has null MX", "SMTP 556 5.1.10"),
        (550, "5.2.1 The email account that you tried to reach is disabled", "SMTP 550 5.2.1"),
        (550, "Recipient address rejected: User unknown (5.1.1).", "SMTP 550 5.1.1"),
        # A block, not a missing address: the next message may pass.
        (550, "5.7.1 Message rejected as spam", None),
        (550, "Relaying denied, see policy 5.7.1.", None),
        (554, "5.7.1 Service unavailable; client host blocked", None),
        (552, "5.2.2 Mailbox full", None),
        # Without an enhanced code a 550 is as often "relaying denied" (every recipient) as "no such
        # user": it bounces that message only.
        (550, "No such user here", None),
        (550, "Relaying denied", None),
        (553, "sender address not allowed", None),
        # Temporary.
        (450, "4.1.1 mailbox temporarily unavailable", None),
        (451, "4.3.0 try again later", None),
        # An IP address is no enhanced code.
        (550, "unknown user (relay 10.5.1.1)", None),
    ],
)
def test_smtp_answers_that_say_the_address_does_not_exist(code: int, text: str, gone: str | None) -> None:
    assert smtp_address_gone(code, text) == gone


def test_twilio_and_fcm_answers_that_say_the_address_does_not_exist() -> None:
    invalid = orjson.dumps({"code": 21211, "message": "The 'To' number +15550100001 is not valid"})
    assert twilio_address_gone(invalid) == "twilio error 21211"  # the code, never the words
    assert twilio_address_gone(orjson.dumps({"code": 21614, "message": "not a mobile number"})) == (
        "twilio error 21614"
    )
    assert twilio_address_gone(orjson.dumps({"code": 20003, "message": "Authenticate"})) is None
    assert twilio_address_gone(b"<html>bad gateway</html>") is None
    assert twilio_address_gone(b"[21211]") is None
    unregistered = {
        "error": {
            "code": 404,
            "status": "NOT_FOUND",
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}
            ],
        }
    }
    assert fcm_unregistered(404, orjson.dumps(unregistered)) == "fcm UNREGISTERED"
    assert fcm_unregistered(400, orjson.dumps(unregistered)) is None
    assert fcm_unregistered(404, orjson.dumps({"error": {"code": 404, "details": "UNREGISTERED"}})) is None
    assert fcm_unregistered(404, b"not json") is None


def test_an_address_is_kept_by_one_form() -> None:
    assert address_form(Channel.EMAIL, "  Ada@Example.COM ", None) == "ada@example.com"
    assert address_form(Channel.SMS, "(555) 010-0199", "US") == "+15550100199"
    assert address_form(Channel.SMS, "(555) 010-0199", None) is None  # no number CLM can send to
    assert address_form(Channel.PUSH, " token-1 ", None) == "token-1"
    assert address_form(Channel.WEBHOOK, "https://example.com/hook", None) is None
    assert address_form(Channel.EMAIL, "   ", None) is None
    # The mailbox the SMTP envelope gets, however the address was written.
    for written in ("Ada <Ada@Example.com>", "<ADA@example.com>", "ada@example.com (Ada)"):
        assert address_form(Channel.EMAIL, written, None) == "ada@example.com"
    assert address_form(Channel.EMAIL, "not an address", None) is None
    assert address_form(Channel.EMAIL, "x" * 320 + "@example.com", None) is None  # longer than any address
    key = suppression_key("salt", Channel.SMS, "+1 555 010 0199", None)
    assert key is not None and key == suppression_key("salt", Channel.SMS, "555.010.0199", "US")
    assert "5550100199" not in key
    # Per channel: a push token that happens to read like an email address is another key.
    assert suppression_key("salt", Channel.EMAIL, "a@b.c", None) != suppression_key(
        "salt", Channel.PUSH, "a@b.c", None
    )
    assert suppression_key("salt", Channel.EMAIL, "a@b.c", None) != suppression_key(
        "pepper", Channel.EMAIL, "a@b.c", None
    )
