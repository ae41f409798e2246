"""Retry backoff, HTTP classification, circuit breaker, token bucket, signed links, Standard Webhooks,
the address policy and email composition."""

from __future__ import annotations

import email
import email.policy
import ipaddress
import random
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest

from services.notifier.domain import standard_webhooks
from services.notifier.domain.address_policy import AddressPolicy, RefusedAddress
from services.notifier.domain.composition import contact_from_traits, locale_of
from services.notifier.domain.email_content import ComposedEmail, build_email, track_links
from services.notifier.domain.provider_guards import CircuitBreaker, TokenBucket
from services.notifier.domain.retry_policy import Failure, RetryPolicy, classify_http
from services.notifier.domain.signing import InvalidToken, LinkSigner, MessageLinks
from services.notifier.settings import NotifierSettings
from shared.contracts import MessageRequested


def plain_email(sender: str, to: str, subject: str = "S") -> ComposedEmail:
    """A mail with a one-letter body and no unsubscribe link: for tests of its headers."""
    return build_email(
        message_id="m",
        sender=sender,
        to=to,
        subject=subject,
        text="t",
        body_html="h",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )


def test_full_jitter_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=1, max_s=10)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # jitter spans the whole window
    assert policy.backoff(1, rng, retry_after_s=7) >= 7
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert policy.next_attempt_at(now, 4, rng) is not None
    assert policy.next_attempt_at(now, 5, rng) is None


def test_http_statuses_are_classified() -> None:
    assert classify_http(200) is None
    assert classify_http(429) is Failure.TRANSIENT and classify_http(503) is Failure.TRANSIENT
    assert classify_http(401) is Failure.PROVIDER
    assert classify_http(400) is Failure.PERMANENT and classify_http(404) is Failure.PERMANENT


def test_circuit_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown_s=10)
    breaker.record_failure(0)
    assert breaker.allows(1)
    breaker.record_failure(1)
    assert not breaker.allows(2)
    assert breaker.allows(12)  # one trial call
    assert not breaker.allows(12.5)
    breaker.record_failure(13)
    assert not breaker.allows(14)
    assert breaker.allows(24)
    breaker.record_success()
    assert breaker.allows(24) and breaker.allows(24)


def test_token_bucket_spreads_sends_over_time() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=2)
    waits = [bucket.reserve(0.0) for _ in range(5)]
    assert waits[:2] == [0, 0]
    assert waits[2:] == pytest.approx([0.1, 0.2, 0.3])
    assert bucket.reserve(10.0) == 0


def test_signed_links_reject_tampering_and_other_purposes() -> None:
    signer = LinkSigner("secret")
    links = MessageLinks(signer, "https://n.example.com/")
    token = links.unsubscribe_token("c1", "email", "news", "m1")
    assert signer.verify("unsubscribe", token) == {"c": "c1", "ch": "email", "t": "news", "m": "m1"}
    with pytest.raises(InvalidToken):
        signer.verify("click", token)
    with pytest.raises(InvalidToken):
        signer.verify("unsubscribe", token[:-2] + "xx")
    with pytest.raises(InvalidToken):
        LinkSigner("other").verify("unsubscribe", token)


def test_standard_webhooks_signature_matches_the_spec_example() -> None:
    # The example from the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert standard_webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    headers = standard_webhooks.headers(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert standard_webhooks.verify(secret, headers, body, now=1614265331)
    assert not standard_webhooks.verify(secret, headers, body, now=1614265330 + 3600)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    with pytest.raises(RefusedAddress):
        AddressPolicy().check_address("h", ipaddress.ip_address(address))


def test_public_and_allow_listed_addresses_pass() -> None:
    AddressPolicy().check_address("h", ipaddress.ip_address("93.184.216.34"))
    AddressPolicy(["127.0.0.0/8"]).check_address("h", ipaddress.ip_address("127.0.0.1"))
    AddressPolicy(["internal.example"]).check_address("internal.example", ipaddress.ip_address("10.0.0.1"))
    with pytest.raises(RefusedAddress, match="scheme"):
        AddressPolicy().check_url("gopher://x")
    with pytest.raises(RefusedAddress, match="metadata"):
        AddressPolicy().check_url("http://metadata.google.internal/")
    with pytest.raises(RefusedAddress, match="credentials"):
        AddressPolicy().check_url("http://u:p@example.com/")


def test_links_are_tracked_but_own_links_are_not() -> None:
    links = MessageLinks(LinkSigner("s"), "https://n.example.com")
    html = '<a href="https://shop.example.com/a?b=1&amp;c=2">x</a><a href="https://n.example.com/u/tok">u</a>'
    out = track_links(html, "m1", links)
    assert "https://shop.example.com" not in out and 'href="https://n.example.com/u/tok"' in out
    token = out.split("/t/c/")[1].split('"')[0]
    assert LinkSigner("s").verify("click", token)["u"] == "https://shop.example.com/a?b=1&c=2"


def test_marketing_email_has_one_click_headers_and_both_parts() -> None:
    mail = build_email(
        message_id="m1",
        sender="CLM <n@clm.example>",
        to="a@example.com",
        subject="S",
        text="t",
        body_html="<p>h</p>",
        unsubscribe_url="https://n.example.com/u/x",
        sent_at_epoch=0,
    )
    parsed = email.message_from_bytes(mail.to_wire(), policy=email.policy.default)
    assert parsed["List-Unsubscribe"] == "<https://n.example.com/u/x>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["Message-ID"] == "<m1@clm.example>"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


def test_non_ascii_headers_and_long_lines_survive_the_wire() -> None:
    subject = "Bienvenue, Zoë ! " * 6
    body = "Ünïcödé " + "x" * 500 + "\n. a line starting with a dot"
    mail = build_email(
        message_id="m2",
        sender="Zoë Café <n@clm.example>",
        to="a@example.com",
        subject=subject,
        text=body,
        body_html=f"<p>{body}</p>",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )
    wire = mail.to_wire()
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    assert parsed["Subject"] == subject.replace("\n", " ")
    assert parsed["From"].addresses[0].display_name == "Zoë Café"
    assert parsed.get_body(preferencelist=("plain",)).get_content().replace("\r\n", "\n").rstrip("\n") == body
    assert parsed["List-Unsubscribe"] is None
    header_injection = plain_email("n@clm.example", "a@example.com", "hi\r\nBcc: evil@example.com")
    assert email.message_from_bytes(header_injection.to_wire())["Bcc"] is None


# Display names with RFC 5322 specials, as written in a profile or request -> (name, mailbox).
NAMES_WITH_SPECIALS = {
    '"Doe, John" <john@example.com>': ("Doe, John", "john@example.com"),
    "john@example.com (Doe, John)": ("Doe, John", "john@example.com"),
    '"Dr. Who" <who@example.com>': ("Dr. Who", "who@example.com"),
    '"Ann \\"The Boss\\" Lee" <ann@example.com>': ('Ann "The Boss" Lee', "ann@example.com"),
    '"back\\\\slash; <x@y>" <bs@example.com>': ("back\\slash; <x@y>", "bs@example.com"),
    '"Shop: a@b [x]" <shop@example.com>': ("Shop: a@b [x]", "shop@example.com"),
    '"=?utf-8?b?QQ==?=" <ew@example.com>': ("=?utf-8?b?QQ==?=", "ew@example.com"),
    # Beyond ASCII: RFC 2047 encoded words, as before (the comma inside them splits nothing).
    '"Müller, Ann" <ann@example.com>': ("Müller, Ann", "ann@example.com"),
}


@pytest.mark.parametrize("written", NAMES_WITH_SPECIALS)
def test_a_display_name_with_specials_is_one_address_in_to_and_from(written: str) -> None:
    """`Doe, John <john@example.com>` unquoted is two addresses to a mail client (`Doe` and `John
    <john@...>`): a name with a comma, quote, dot, @, <, >, ... goes as a quoted string."""
    name, mailbox = NAMES_WITH_SPECIALS[written]
    mail = plain_email(written, written)
    wire = mail.to_wire()
    assert wire.isascii()
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    for header in ("To", "From"):
        assert [(a.display_name, a.addr_spec) for a in parsed[header].addresses] == [(name, mailbox)]
        # And as the compat32 parser (`getaddresses`, what simpler clients use) reads it.
        raw = email.message_from_bytes(wire)[header]
        assert len(getaddresses([raw])) == 1 and getaddresses([raw])[0][1] == mailbox
    assert mail.envelope_from == mailbox


def test_a_plain_display_name_stays_unquoted() -> None:
    mail = plain_email("CLM <noreply@clm.local>", "Ann Lee <ann@example.com>")
    assert (mail.header("From"), mail.header("To")) == (
        "CLM <noreply@clm.local>",
        "Ann Lee <ann@example.com>",
    )


# ASCII display names that a quoted string cannot carry: control characters (raw in the header even
# inside quotes; some systems cut a header at a NUL) and names longer than a header line may be.
NAMES_AS_ENCODED_WORDS = [
    "a\x00b",
    "Ann\x0bLee",
    "x\x7fy",
    "x,\x01y",
    "A" * 1200,  # a quoted string of 1,200: a 1,222-octet header line, past RFC 5322's 998
    "A " * 600,
    "x" * 80 + "," + "y" * 80,
]


def _decoded(raw_phrase: str) -> str:
    """A display name as an RFC 2047 reader gets it: whitespace between encoded words is no part of
    the text (Python's address parser keeps it, unlike its `decode_header`)."""
    return str(make_header(decode_header(raw_phrase)))


@pytest.mark.parametrize("name", NAMES_AS_ENCODED_WORDS)
def test_a_display_name_a_quoted_string_cannot_carry_goes_as_encoded_words(name: str) -> None:
    written = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '" <ann@example.com>'
    mail = plain_email(written, written)
    wire = mail.to_wire()
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))  # RFC 5322; encoded words fold
    assert not any((b < 32 and b not in (9, 10, 13)) or b == 127 for b in head)  # no control byte
    for header in ("To", "From"):
        [(raw_name, mailbox)] = getaddresses([email.message_from_bytes(wire)[header]])
        assert mailbox == "ann@example.com"
        assert _decoded(raw_name) == name


def test_a_subject_with_a_control_character_or_too_long_for_a_line_goes_as_encoded_words() -> None:
    for subject in ("Sale\x00 today", "Big sale " * 150):
        mail = plain_email("n@clm.example", "a@example.com", subject)
        wire = mail.to_wire()
        head = wire.split(b"\r\n\r\n", 1)[0]
        assert all(len(line) <= 998 for line in head.split(b"\r\n"))
        assert b"\x00" not in head
        parsed = email.message_from_bytes(wire, policy=email.policy.default)
        assert parsed["Subject"] == subject
    # An ordinary subject stays as written.
    plain = plain_email("n@clm.example", "a@example.com", "Welcome, Bob!")
    assert plain.header("Subject") == "Welcome, Bob!"


def test_the_default_retries_ride_out_a_provider_outage_of_minutes() -> None:
    """Nine retries: on average ~18 minutes from the first failure to giving up (full jitter: half of
    each ceiling), ~37 at most; 5 attempts from 2 s used to give up after ~15 s on average."""
    settings = NotifierSettings()
    policy = RetryPolicy(settings.send_max_attempts, settings.retry_base_s, settings.retry_max_s)
    ceilings = [min(policy.max_s, policy.base_s * 2 ** (a - 1)) for a in range(1, policy.max_attempts)]
    assert 15 * 60 <= sum(ceilings) / 2 <= 25 * 60
    rng = random.Random(3)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    windows = []
    for _ in range(200):
        at, attempt = now, 1
        while (following := policy.next_attempt_at(at, attempt, rng)) is not None:
            at, attempt = following, attempt + 1
        windows.append((at - now).total_seconds())
    assert attempt == settings.send_max_attempts
    assert 12 * 60 < sorted(windows)[100] < 25 * 60  # the median outage ridden out


def test_traits_that_are_not_text_are_no_address_locale_or_zone() -> None:
    """Traits are whatever clients sent: `false` is no email address, a number no locale (it made
    the renderer fail the message with an internal error), a huge float no phone."""
    hostile = {
        "email": False,
        "phone": -1.07e290,
        "locale": 72057594037927936,
        "timezone": 7,
        "push_token": {"a": 1},
        "webhook_url": " ",
    }
    contact = contact_from_traits("c1", hostile)
    assert (contact.email, contact.phone, contact.locale, contact.timezone) == (None, None, None, None)
    assert (contact.push_token, contact.webhook_url) == (None, None)
    request = MessageRequested.model_validate(
        {
            "message_id": "m1",
            "customer_id": "c1",
            "channel": "email",
            "template_id": "t",
            "requested_at": "2026-11-29T00:00:00Z",
            "data": {"traits": hostile},
        }
    )
    assert locale_of(request, contact) is None
    fine = contact_from_traits("c2", {"email": "a@example.com", "phone": 4791234567, "locale": "nb-NO"})
    assert (fine.email, fine.phone, fine.locale) == ("a@example.com", "4791234567", "nb-NO")
    assert contact_from_traits("c3", {"phone": True}).phone is None
