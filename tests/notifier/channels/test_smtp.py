"""The SMTP provider against real SMTP servers on loopback: which refusals are the server's (retried,
failed over, counted by the breaker) and which the message's; addresses beyond ASCII (SMTPUTF8);
what becomes of a connection after an error."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest
from pydantic import SecretStr

from deploy.local.smtp_sink import MailSink
from services.notifier.channels.base import Delivery
from services.notifier.channels.router import GuardedProvider, ProviderRouter
from services.notifier.channels.smtp import NO_SMTPUTF8, UNWRITABLE, SmtpProvider
from services.notifier.domain.email_addresses import (
    DOMAIN_WITHOUT_IDNA,
    SENDER,
    domain_without_idna,
    local_part_beyond_ascii,
)
from services.notifier.domain.email_content import build_email
from services.notifier.domain.provider_guards import CircuitBreaker, TokenBucket
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import ProviderConfig
from shared.contracts import Channel
from tests.notifier.provider_servers import ScriptedSmtp


def delivery(to: str = "ann@example.com", message_id: str = "m1") -> Delivery:
    email = build_email(
        message_id=message_id,
        sender="CLM <noreply@clm.local>",
        to=to,
        subject="Receipt",
        text="Thanks",
        body_html="<p>Thanks</p>",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )
    return Delivery(message_id, "c1", Channel.EMAIL, to, {}, email)


def smtp(name: str, port: int, **config: Any) -> SmtpProvider:
    return SmtpProvider(name, ProviderConfig(kind="smtp", host="127.0.0.1", port=port, timeout_s=5, **config))


async def nothing() -> None:
    pass


@pytest.fixture
async def scripted() -> AsyncIterator[list[ScriptedSmtp]]:
    servers: list[ScriptedSmtp] = []
    yield servers
    for server in servers:
        await server.stop()


def guarded(name: str, port: int, threshold: int) -> GuardedProvider:
    """A relay behind its breaker (opening after `threshold` failures), as the notifier routes it."""
    return GuardedProvider(smtp(name, port), CircuitBreaker(threshold, 60), TokenBucket(1000, 1000), 4)


def email_router(*providers: GuardedProvider) -> ProviderRouter:
    """Email through `providers`, the first first, failing over in order."""
    return ProviderRouter({Channel.EMAIL: list(providers)}, list(providers))


async def start(servers: list[ScriptedSmtp], **script: Any) -> ScriptedSmtp:
    server = await ScriptedSmtp(**script).start()
    servers.append(server)
    return server


# Refusals before any recipient: the relay will not work for us, whoever the mail is for.
REFUSED_BEFORE_RECIPIENTS = {
    "greeting": ({"greeting": "554 5.7.1 Service unavailable; client host [127.0.0.1] blocked"}, {}),
    "ehlo_and_helo": (
        {"answers": {"EHLO": "554 5.7.1 go away", "HELO": "554 5.7.1 go away"}},
        {},
    ),
    "starttls": ({"extensions": ("STARTTLS",)}, {"start_tls": True}),
    "auth": (
        {"extensions": ("AUTH PLAIN LOGIN",), "answers": {"AUTH": "535 5.7.8 bad credentials"}},
        {"username": "clm", "password": SecretStr("wrong")},
    ),
    "mail_from": ({"answers": {"MAIL": "550 5.7.1 sender address rejected: not owned by you"}}, {}),
    "mail_from_later": ({"answers": {"MAIL": "451 4.3.0 try again later"}}, {}),
}


@pytest.mark.parametrize("stage", REFUSED_BEFORE_RECIPIENTS)
@pytest.mark.parametrize("in_steps", [True, False], ids=["with_hook", "sendmail"])
async def test_a_refusal_before_any_recipient_is_the_servers_not_a_bounce(
    scripted: list[ScriptedSmtp], stage: str, in_steps: bool
) -> None:
    script, config = REFUSED_BEFORE_RECIPIENTS[stage]
    server = await start(scripted, **script)
    provider = smtp("smtp", server.port, **config)
    result = await provider.send(delivery(), nothing if in_steps else None)
    assert not result.ok
    # Retried and failed over, never `bounced` (nor the address suppressed) for the server's refusal.
    expected = Failure.TRANSIENT if stage in ("starttls", "mail_from_later") else Failure.PROVIDER
    assert result.failure is expected, result.reason
    assert result.address_gone is None
    assert "RCPT" not in server.verbs()
    await provider.close()


@pytest.mark.parametrize(
    ("answers", "failure", "gone"),
    [
        ({"RCPT": "550 5.1.1 no such user"}, Failure.BOUNCE, "SMTP 550 5.1.1"),
        ({"RCPT": "554 5.7.1 recipient refused by policy"}, Failure.BOUNCE, None),
        ({"RCPT": "450 4.2.0 greylisted"}, Failure.TRANSIENT, None),
        ({"DATA.": "554 5.7.1 message refused as spam"}, Failure.BOUNCE, None),
        ({"DATA.": "552 5.3.4 message too big"}, Failure.PERMANENT, None),
        # DATA itself refused, before its 354: no body seen, so the server refuses us (it fails over).
        ({"DATA": "554 5.7.1 data command rejected by policy"}, Failure.PROVIDER, None),
        ({"DATA": "451 4.3.0 try again later"}, Failure.TRANSIENT, None),
        ({"MAIL": "552 5.3.4 message size exceeds fixed limit"}, Failure.PERMANENT, None),
    ],
    ids=[
        "rcpt_gone",
        "rcpt_policy",
        "rcpt_later",
        "data_spam",
        "data_size",
        "data_command",
        "data_command_later",
        "mail_from_size",
    ],
)
async def test_refusals_of_the_recipient_or_message_keep_their_meaning(
    scripted: list[ScriptedSmtp], answers: dict[str, str], failure: Failure, gone: str | None
) -> None:
    server = await start(scripted, answers=answers)
    provider = smtp("smtp", server.port)
    result = await provider.send(delivery(), nothing)
    assert (result.failure, result.address_gone) == (failure, gone), result.reason
    await provider.close()


# What relays answer at RCPT when they refuse us rather than the recipient (Postfix holds its client,
# HELO and sender restrictions until RCPT by default: `smtpd_delay_reject = yes`).
RELAY_REFUSALS_AT_RCPT = {
    "postfix_client": "554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied",
    "postfix_relay": "554 5.7.1 <ann@example.com>: Relay access denied",
    "postfix_helo": "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
    # A 5.1.1 about our sender: it suppressed the recipient's address, for good.
    "postfix_sender": "550 5.1.1 <noreply@clm.local>: Sender address rejected: User unknown",
    "postfix_dnsbl": "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
    "exim_relay": "550 relay not permitted",
    "exim_sender": "550 Sender verify failed",
    "sendmail_relay": "550 5.7.1 <ann@example.com>... Relaying denied",
    "m365_relay": "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
    "m365_tenant": "550 5.7.64 TenantAttribution; Relay Access Denied",
    "m365_banned_ip": "550 5.7.606 Access denied, banned sending IP [192.0.2.1]",
}


@pytest.mark.parametrize("answer", RELAY_REFUSALS_AT_RCPT.values(), ids=RELAY_REFUSALS_AT_RCPT.keys())
@pytest.mark.parametrize("in_steps", [True, False], ids=["with_hook", "sendmail"])
async def test_a_relay_refusing_us_at_rcpt_is_the_servers_not_a_bounce(
    scripted: list[ScriptedSmtp], answer: str, in_steps: bool
) -> None:
    server = await start(scripted, answers={"RCPT": answer})
    provider = smtp("smtp", server.port)
    result = await provider.send(delivery(), nothing if in_steps else None)
    assert (result.failure, result.address_gone) == (Failure.PROVIDER, None), result.reason
    assert result.reason == f"SMTP recipient refused: {answer}"
    await provider.close()


@pytest.mark.parametrize(
    ("answer", "failure", "gone"),
    [
        (
            "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown in local recipient table",
            Failure.BOUNCE,
            "SMTP 550 5.1.1",
        ),
        (
            "550 5.1.1 The email account that you tried to reach does not exist",
            Failure.BOUNCE,
            "SMTP 550 5.1.1",
        ),
        ("550 mailbox unavailable", Failure.BOUNCE, None),
        ("550 5.2.1 The email account that you tried to reach is disabled", Failure.BOUNCE, "SMTP 550 5.2.1"),
        (
            "450 4.7.1 <unknown[192.0.2.1]>: Client host rejected: cannot find your hostname",
            Failure.TRANSIENT,
            None,
        ),
    ],
    ids=["postfix_unknown", "gmail_unknown", "bare_550", "disabled", "client_later"],
)
async def test_a_refusal_of_the_recipient_at_rcpt_still_bounces(
    scripted: list[ScriptedSmtp], answer: str, failure: Failure, gone: str | None
) -> None:
    server = await start(scripted, answers={"RCPT": answer})
    provider = smtp("smtp", server.port)
    result = await provider.send(delivery(), nothing)
    assert (result.failure, result.address_gone) == (failure, gone), result.reason
    await provider.close()


async def test_a_relay_refusing_us_at_rcpt_fails_over_and_counts_against_its_breaker(
    scripted: list[ScriptedSmtp],
) -> None:
    refusing = await start(scripted, answers={"RCPT": RELAY_REFUSALS_AT_RCPT["postfix_client"]})
    backup = await start(scripted)
    primary = guarded("smtp_refusing", refusing.port, 2)
    second = guarded("smtp", backup.port, 2)
    router = email_router(primary, second)
    for n in range(3):
        name, result = await router.send(delivery(message_id=f"m{n}"), nothing)
        assert (name, result.ok) == ("smtp", True)
    assert primary.breaker.is_open
    assert refusing.verbs().count("RCPT") == 2 and not refusing.messages
    assert len(backup.messages) == 3
    await router.close()


async def test_a_relay_refusing_the_greeting_fails_over_and_counts_against_its_breaker(
    scripted: list[ScriptedSmtp],
) -> None:
    blocked = await start(scripted, greeting="554 5.7.1 client host blocked")
    backup = await start(scripted)
    primary = guarded("smtp_blocked", blocked.port, 2)
    second = guarded("smtp", backup.port, 2)
    router = email_router(primary, second)
    for n in range(3):
        name, result = await router.send(delivery(message_id=f"m{n}"), nothing)
        assert (name, result.ok) == ("smtp", True)
    # Two refusals opened the primary's circuit: the third mail went straight to the backup.
    assert primary.breaker.is_open
    assert blocked.connections == 2
    assert len(backup.messages) == 3
    await router.close()


async def test_a_non_ascii_address_goes_with_smtputf8_when_the_server_offers_it(
    scripted: list[ScriptedSmtp],
) -> None:
    server = await start(scripted, extensions=("8BITMIME", "SMTPUTF8"))
    provider = smtp("smtp", server.port)
    for in_steps in (True, False):
        result = await provider.send(delivery("José <josé@example.com>"), nothing if in_steps else None)
        assert result.ok, result.reason
    mails = [c for c in server.commands if c.startswith(b"MAIL")]
    rcpts = [c for c in server.commands if c.startswith(b"RCPT")]
    assert all(b"SMTPUTF8" in c for c in mails) and len(mails) == 2
    assert rcpts == [b"RCPT TO:<jos\xc3\xa9@example.com>"] * 2
    assert len(server.messages) == 2 and b"jos\xc3\xa9@example.com" in server.messages[0]
    # An ASCII address on the same connection still goes without it.
    assert (await provider.send(delivery(), nothing)).ok
    assert b"SMTPUTF8" not in server.commands[-5]
    assert server.connections == 1
    await provider.close()


async def test_a_non_ascii_address_fails_at_once_where_the_server_lacks_smtputf8(
    scripted: list[ScriptedSmtp],
) -> None:
    server = await start(scripted)
    provider = smtp("smtp", server.port)
    gp = GuardedProvider(provider, CircuitBreaker(2, 60), TokenBucket(1000, 1000), 4)
    router = email_router(gp)
    for n in range(4):
        name, result = await router.send(delivery("josé@example.com", f"m{n}"), nothing)
        # The message can never go there: failed for good, the address not blamed, the server neither.
        assert (name, result.failure, result.address_gone) == ("smtp", Failure.PERMANENT, None)
        assert result.reason == f"SMTP: {NO_SMTPUTF8}"
    assert not gp.breaker.is_open and gp.breaker.failures == 0
    assert "MAIL" not in server.verbs()  # nothing of the envelope went out
    name, result = await router.send(delivery(), nothing)
    assert (name, result.ok) == ("smtp", True)
    assert server.connections == 1  # the connection stayed clean, and pooled
    await router.close()


async def test_a_real_server_without_smtputf8_is_not_sent_a_non_ascii_address() -> None:
    sink = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    try:
        provider = smtp("smtp", sink.port)
        result = await provider.send(delivery("josé@example.com"), nothing)
        assert (result.failure, result.reason) == (Failure.PERMANENT, f"SMTP: {NO_SMTPUTF8}")
        assert (await provider.send(delivery(), nothing)).ok
        assert [m.envelope_to for m in sink.messages] == [["ann@example.com"]]
        await provider.close()
    finally:
        await sink.stop()


# An ASCII local part at a domain beyond ASCII -> the mailbox a server without SMTPUTF8 is given.
IDN_MAILBOXES = {
    "user@bücher.example": "user@xn--bcher-kva.example",
    "User@Bücher.Example": "User@xn--bcher-kva.example",  # UTS 46 lower-cases the domain only
    "ann@例子.广告": "ann@xn--fsqu00a.xn--4rr70v",
    "kurt@straße.de": "kurt@xn--strae-oqa.de",  # IDNA 2008: ß kept, not mapped to ss
}


@pytest.mark.parametrize("to", IDN_MAILBOXES)
async def test_a_real_server_without_smtputf8_takes_a_domain_beyond_ascii_as_a_labels(to: str) -> None:
    """Before, any address beyond ASCII failed on such a server; a domain alone has an ASCII form (its
    IDNA A-labels), the same mail domain: the envelope and the To header carry it, no SMTPUTF8."""
    alabels = IDN_MAILBOXES[to]
    sink = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    try:
        provider = smtp("smtp", sink.port)
        for in_steps in (True, False):
            result = await provider.send(delivery(f'"Doe, John" <{to}>'), nothing if in_steps else None)
            assert result.ok, result.reason
        assert [m.envelope_to for m in sink.messages] == [[alabels]] * 2
        mail = sink.messages[0]
        assert mail.raw.isascii()
        assert [(a.display_name, a.addr_spec) for a in mail.message["To"].addresses] == [
            ("Doe, John", alabels)
        ]
        await provider.close()
    finally:
        await sink.stop()


async def test_a_domain_beyond_ascii_goes_as_written_where_smtputf8_is_offered(
    scripted: list[ScriptedSmtp],
) -> None:
    server = await start(scripted, extensions=("8BITMIME", "SMTPUTF8"))
    provider = smtp("smtp", server.port)
    assert (await provider.send(delivery("user@bücher.example"), nothing)).ok
    assert [c for c in server.commands if c.startswith((b"MAIL", b"RCPT"))] == [
        b"MAIL FROM:<noreply@clm.local> SMTPUTF8",
        "RCPT TO:<user@bücher.example>".encode(),
    ]
    assert b"To: user@b\xc3\xbccher.example\r\n" in server.messages[0]
    await provider.close()


async def test_an_idn_sender_goes_as_a_labels_without_smtputf8(scripted: list[ScriptedSmtp]) -> None:
    server = await start(scripted)  # no SMTPUTF8
    provider = smtp("smtp", server.port)
    email_ = build_email(
        message_id="m1",
        sender='"Bücher, Shop" <news@bücher.example>',
        to="ann@example.com",
        subject="Receipt",
        text="Thanks",
        body_html="<p>Thanks</p>",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )
    result = await provider.send(Delivery("m1", "c1", Channel.EMAIL, "ann@example.com", {}, email_), nothing)
    assert result.ok, result.reason
    assert [c for c in server.commands if c.startswith((b"MAIL", b"RCPT"))] == [
        b"MAIL FROM:<news@xn--bcher-kva.example>",
        b"RCPT TO:<ann@example.com>",
    ]
    assert server.messages[0].isascii()
    parsed = email.message_from_bytes(server.messages[0], policy=email.policy.default)
    assert [(a.display_name, a.addr_spec) for a in parsed["From"].addresses] == [
        ("Bücher, Shop", "news@xn--bcher-kva.example")
    ]
    assert parsed["Message-ID"] == "<m1@xn--bcher-kva.example>"
    await provider.close()


# Without SMTPUTF8 these have no ASCII form -> the reason they fail.
NO_ASCII_FORM = {
    "josé@bücher.example": NO_SMTPUTF8,  # a local part beyond ASCII: only SMTPUTF8 carries it
    "ann@☃.net": DOMAIN_WITHOUT_IDNA,  # a symbol IDNA 2008 does not allow
    # UTS 46 would map these to another domain (full-width letters to example.com, u + U+0308 to
    # bücher.example), whose suppressions, complaints and erasure are keyed under that other form.
    "ann@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.\uff43\uff4f\uff4d": DOMAIN_WITHOUT_IDNA,
    "ann@bu\u0308cher.example": DOMAIN_WITHOUT_IDNA,
}


@pytest.mark.parametrize("to", NO_ASCII_FORM)
async def test_an_address_without_an_ascii_form_still_fails_at_once_without_smtputf8(
    scripted: list[ScriptedSmtp], to: str
) -> None:
    server = await start(scripted)  # no SMTPUTF8
    provider = smtp("smtp", server.port)
    result = await provider.send(delivery(to), nothing)
    assert (result.failure, result.reason, result.address_gone) == (
        Failure.PERMANENT,
        f"SMTP: {NO_ASCII_FORM[to]}",
        None,
    )
    assert "MAIL" not in server.verbs()  # nothing of the envelope went out
    assert (await provider.send(delivery(), nothing)).ok
    assert server.connections == 1  # the connection stayed clean, and pooled
    await provider.close()


NAMED_ASCII_MAILBOXES = {
    "José <jose@example.com>": ("jose@example.com", "José"),
    "jose@example.com (José)": ("jose@example.com", "José"),
    '"Müller, Ann" <ann@example.com>': ("ann@example.com", "Müller, Ann"),
}


@pytest.mark.parametrize("to", NAMED_ASCII_MAILBOXES)
@pytest.mark.parametrize("offers_smtputf8", [False, True], ids=["no_smtputf8", "smtputf8"])
async def test_an_ascii_mailbox_with_a_non_ascii_name_needs_no_smtputf8(
    scripted: list[ScriptedSmtp], to: str, offers_smtputf8: bool
) -> None:
    """Only the envelope (the mailbox) goes on MAIL FROM / RCPT TO: a display name beyond ASCII is the
    To: header's business (RFC 2047), so the mail goes everywhere, without SMTPUTF8."""
    mailbox, name = NAMED_ASCII_MAILBOXES[to]
    extensions = ("8BITMIME", "SMTPUTF8") if offers_smtputf8 else ("8BITMIME",)
    server = await start(scripted, extensions=extensions)
    provider = smtp("smtp", server.port)
    for in_steps in (True, False):
        result = await provider.send(delivery(to), nothing if in_steps else None)
        assert result.ok, result.reason
    mails = [c for c in server.commands if c.startswith(b"MAIL")]
    rcpts = [c for c in server.commands if c.startswith(b"RCPT")]
    assert mails == [b"MAIL FROM:<noreply@clm.local>"] * 2
    assert rcpts == [f"RCPT TO:<{mailbox}>".encode()] * 2
    header = email.message_from_bytes(server.messages[0], policy=email.policy.default)["To"]
    assert (header.addresses[0].display_name, header.addresses[0].addr_spec) == (name, mailbox)
    assert server.messages[0].isascii()  # the name as RFC 2047 encoded words
    await provider.close()


@pytest.mark.parametrize("to", NAMED_ASCII_MAILBOXES)
async def test_a_real_server_without_smtputf8_takes_a_non_ascii_name(to: str) -> None:
    mailbox, name = NAMED_ASCII_MAILBOXES[to]
    sink = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    try:
        provider = smtp("smtp", sink.port)
        for in_steps in (True, False):
            result = await provider.send(delivery(to), nothing if in_steps else None)
            assert result.ok, result.reason
        assert [m.envelope_to for m in sink.messages] == [[mailbox]] * 2
        to_header = sink.messages[0].message["To"]
        assert (to_header.addresses[0].display_name, to_header.addresses[0].addr_spec) == (name, mailbox)
        await provider.close()
    finally:
        await sink.stop()


@pytest.mark.parametrize("to", ["ann smith@example.com", "ann@example.com\ud800"], ids=["space", "surrogate"])
async def test_an_address_no_smtp_command_line_can_hold_fails_at_once(
    scripted: list[ScriptedSmtp], to: str
) -> None:
    server = await start(scripted, extensions=("8BITMIME", "SMTPUTF8"))
    gp = guarded("smtp", server.port, 1)
    router = email_router(gp)
    name, result = await router.send(delivery(to), nothing)
    assert (name, result.failure, result.reason) == ("smtp", Failure.PERMANENT, f"SMTP: {UNWRITABLE}")
    assert not gp.breaker.is_open
    assert "MAIL" not in server.verbs()
    await router.close()


async def test_an_unexpected_error_closes_the_connection_and_spares_the_breaker(
    scripted: list[ScriptedSmtp],
) -> None:
    """The `sending` commit (the hook) failed with a database error after MAIL FROM and RCPT TO:
    the connection, mid-envelope, must not go back to the pool; the error is no provider's."""
    server = await start(scripted)
    gp = guarded("smtp", server.port, 1)
    router = email_router(gp)

    async def commit_fails() -> None:
        raise RuntimeError("the database went away")

    name, result = await router.send(delivery(), commit_fails)
    assert (name, result.failure) == ("smtp", Failure.TRANSIENT)
    assert result.reason is not None and "RuntimeError" in result.reason
    assert not gp.breaker.is_open and gp.breaker.failures == 0
    name, result = await router.send(delivery(message_id="m2"), nothing)
    assert (name, result.ok) == ("smtp", True)
    assert server.connections == 2  # the first one was closed, not reused
    assert len(server.messages) == 1
    await router.close()


async def test_a_no_break_space_around_the_address_is_not_sent(scripted: list[ScriptedSmtp]) -> None:
    """`mailbox()` reads `Ann@Example.com` + U+00A0 as `ann@example.com` (suppressions and erasures
    key it so): the envelope gets that mailbox, ASCII, to a server without SMTPUTF8 too."""
    server = await start(scripted)
    provider = smtp("smtp", server.port)
    for in_steps in (True, False):
        result = await provider.send(delivery("Ann@Example.com\u00a0"), nothing if in_steps else None)
        assert result.ok, result.reason
    assert [c for c in server.commands if c.startswith(b"RCPT")] == [b"RCPT TO:<Ann@Example.com>"] * 2
    assert b"To: Ann@Example.com\r\n" in server.messages[0]
    await provider.close()


# Unexpected errors (a bug, ours or aiosmtplib's) by when they come: before DATA nothing was handed
# over, so the message is retried and failed over; once DATA is answered 354 the server may have it.


@pytest.mark.parametrize("verb", ["mail", "rcpt"])
async def test_an_unexpected_error_before_data_fails_over_and_spares_the_breaker(
    scripted: list[ScriptedSmtp], monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    """It was taken for "outcome unknown", not resent: the `sending` commit, which runs while MAIL
    FROM and RCPT TO go out, had finished, and that counted as the point of no return."""
    server = await start(scripted)
    backup_server = await start(scripted)
    primary = guarded("smtp", server.port, 1)
    backup = guarded("smtp_backup", backup_server.port, 1)
    router = email_router(primary, backup)
    original = getattr(aiosmtplib.SMTP, verb)
    calls = 0

    async def fails_once(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"a bug in {verb}")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(aiosmtplib.SMTP, verb, fails_once)
    marks: list[str] = []

    async def mark_sending() -> None:
        marks.append("sending")

    name, result = await router.send(delivery(), mark_sending)
    assert (name, result.ok) == ("smtp_backup", True), result.reason
    assert marks == ["sending"]
    assert "DATA" not in server.verbs() and not server.messages
    assert len(backup_server.messages) == 1
    # A bug of ours more likely than the server's: not held against it.
    assert not primary.breaker.is_open and primary.breaker.failures == 0
    # Alone, it is retried (transient), nothing lost.
    calls = 0
    alone = email_router(primary)
    name, result = await alone.send(delivery(message_id="m2"), nothing)
    assert (name, result.failure) == ("smtp", Failure.TRANSIENT), result.reason
    await router.close()


async def test_an_unexpected_error_once_data_started_is_outcome_unknown(
    scripted: list[ScriptedSmtp], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start(scripted)
    backup_server = await start(scripted)
    primary = guarded("smtp", server.port, 1)
    backup = guarded("smtp_backup", backup_server.port, 1)
    router = email_router(primary, backup)
    original = SmtpProvider._data

    async def answer_lost(*args: Any) -> Any:
        await original(*args)
        raise RuntimeError("the answer was lost")

    monkeypatch.setattr(SmtpProvider, "_data", staticmethod(answer_lost))
    name, result = await router.send(delivery(), nothing)
    assert (name, result.failure) == ("smtp", Failure.PERMANENT)
    assert result.reason is not None and result.reason.startswith("outcome unknown: smtp: RuntimeError")
    assert len(server.messages) == 1 and not backup_server.commands
    assert primary.breaker.is_open
    await router.close()


async def test_a_message_that_cannot_be_encoded_fails_at_once_unsent(scripted: list[ScriptedSmtp]) -> None:
    """A lone surrogate in the rendered text was reported "outcome unknown" (after MAIL FROM and RCPT
    TO) and counted by the breaker: two such messages opened the circuit for every email."""
    server = await start(scripted)
    gp = guarded("smtp", server.port, 2)
    router = email_router(gp)
    for n in range(2):
        email = build_email(
            message_id=f"m{n}",
            sender="a@example.com",
            to="x@example.com",
            subject="s",
            text="bad \ud800",
            body_html="h",
            unsubscribe_url=None,
            sent_at_epoch=0,
        )
        name, result = await router.send(
            Delivery(f"m{n}", "c1", Channel.EMAIL, "x@example.com", {}, email), nothing
        )
        assert (name, result.failure, result.reason) == (
            "smtp",
            Failure.PERMANENT,
            "SMTP: the message cannot be encoded (UnicodeEncodeError)",
        )
    assert not gp.breaker.is_open and gp.breaker.failures == 0
    assert not server.commands
    await router.close()


async def test_a_connection_lost_once_the_body_went_out_is_outcome_unknown(
    scripted: list[ScriptedSmtp],
) -> None:
    """The server had the message when the connection dropped before its answer: retried and failed
    over, the customer could get it twice."""
    server = await start(scripted, hangs_up_at="DATA.")
    backup_server = await start(scripted)
    primary = guarded("smtp", server.port, 1)
    backup = guarded("smtp_backup", backup_server.port, 1)
    router = email_router(primary, backup)
    name, result = await router.send(delivery(), nothing)
    assert (name, result.failure) == ("smtp", Failure.PERMANENT)
    assert result.reason is not None
    assert result.reason.startswith("outcome unknown: smtp: SMTPServerDisconnected")
    assert len(server.messages) == 1 and not backup_server.commands
    assert primary.breaker.is_open
    await router.close()


async def test_an_unreadable_final_reply_once_the_body_went_out_is_outcome_unknown(
    scripted: list[ScriptedSmtp],
) -> None:
    """A garbled answer to the body (a broken relay or proxy) is no refusal: the server may have
    queued the message. It was taken for a refusal of us and failed over: sent twice."""
    server = await start(scripted, answers={"DATA.": "garbled, no reply code"})
    backup_server = await start(scripted)
    primary = guarded("smtp", server.port, 5)
    backup = guarded("smtp_backup", backup_server.port, 5)
    router = email_router(primary, backup)
    name, result = await router.send(delivery(), nothing)
    assert (name, result.failure) == ("smtp", Failure.PERMANENT)
    assert result.reason is not None and result.reason.startswith("outcome unknown: smtp:"), result.reason
    assert len(server.messages) == 1 and not backup_server.commands
    await router.close()


async def test_a_connection_lost_on_data_before_its_354_fails_over(scripted: list[ScriptedSmtp]) -> None:
    """A relay restarting (or overloaded) as DATA went out never got the body: this was "outcome
    unknown", failed for good, when the point of no return was DATA itself rather than its 354."""
    server = await start(scripted, hangs_up_at="DATA")
    backup_server = await start(scripted)
    primary = guarded("smtp", server.port, 5)
    backup = guarded("smtp_backup", backup_server.port, 5)
    router = email_router(primary, backup)
    name, result = await router.send(delivery(), nothing)
    assert (name, result.ok) == ("smtp_backup", True), result.reason
    assert "DATA" in server.verbs() and not server.messages
    assert len(backup_server.messages) == 1
    await router.close()
    # Alone, it is retried (transient), nothing lost.
    alone = email_router(primary)
    name, result = await alone.send(delivery(message_id="m2"), nothing)
    assert (name, result.failure) == ("smtp", Failure.TRANSIENT), result.reason
    assert result.reason is not None and "SMTPServerDisconnected" in result.reason
    await alone.close()


async def test_the_body_goes_out_as_aiosmtplib_wrote_it() -> None:
    """Lines starting with a dot are doubled on the wire (and undone by the server), bare line
    endings made CRLF: the body written after the 354 is `SMTP.data`'s."""
    sink = await MailSink.start()
    try:
        provider = smtp("smtp", sink.port)
        text = ".hidden\n.\nend\rlast"
        email_ = build_email(
            message_id="m1",
            sender="CLM <noreply@clm.local>",
            to="ann@example.com",
            subject="Dots",
            text=text,
            body_html="<p>x</p>",
            unsubscribe_url=None,
            sent_at_epoch=0,
        )
        result = await provider.send(
            Delivery("m1", "c1", Channel.EMAIL, "ann@example.com", {}, email_), nothing
        )
        assert (result.ok, result.reason) == (True, "Message accepted")  # the final reply's text
        [mail] = sink.messages
        plain = mail.message.get_body(("plain",))
        assert plain is not None
        assert plain.get_content().replace("\r\n", "\n").startswith(".hidden\n.\nend\nlast")
        await provider.close()
    finally:
        await sink.stop()


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("CLM <josé@bücher.example>", local_part_beyond_ascii(SENDER)),
        ("CLM <news@☃.net>", domain_without_idna(SENDER)),
    ],
)
async def test_a_sender_without_an_ascii_form_is_named_as_the_cause(
    scripted: list[ScriptedSmtp], sender: str, reason: str
) -> None:
    """The reason said "the email address" when the sender (configuration: every message from it
    fails so) was the cause, sending an operator to look at the customer's address."""
    server = await start(scripted)  # no SMTPUTF8
    provider = smtp("smtp", server.port)
    email_ = build_email(
        message_id="m1",
        sender=sender,
        to="ann@bücher.example",  # has an ASCII form: not the cause
        subject="Receipt",
        text="Thanks",
        body_html="<p>Thanks</p>",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )
    result = await provider.send(
        Delivery("m1", "c1", Channel.EMAIL, "ann@bücher.example", {}, email_), nothing
    )
    assert (result.failure, result.reason) == (Failure.PERMANENT, f"SMTP: {reason}")
    assert reason.startswith(("the sender address (CLM_SMTP_SENDER", "the domain of the sender address"))
    assert "MAIL" not in server.verbs()
    await provider.close()
