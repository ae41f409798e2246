"""Email addresses beyond ASCII: an internationalized mailbox goes with SMTPUTF8 where the server
offers it and fails at once where it does not; an address with an invisible character pasted in
fails at once as no mailbox. Neither is retried as a provider outage, and neither opens the SMTP
circuit for everyone else's mail (five of them did, for `circuit_cooldown_s`)."""

from __future__ import annotations

from typing import Any

from deploy.local.smtp_sink import MailSink
from services.notifier.channels.smtp import NO_SMTPUTF8
from services.notifier.domain.email_addresses import RULE
from shared.contracts import Channel
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually

RECEIPT = {
    "id": "receipt",
    "name": "Receipt",
    "channel": "email",
    "default_locale": "en",
    "variants": {"en": {"subject": "Receipt", "html": "<p>Thanks</p>", "text": "Thanks"}},
}


async def send(h: Harness, message_id: str, address: str) -> None:
    await h.publish(
        request(
            message_id,
            f"c-{message_id}",
            "email",
            "receipt",
            category="transactional",
            recipient={"email": address},
        )
    )


async def entry(h: Harness, message_id: str, state: str) -> dict[str, Any]:
    found: dict[str, Any] = await eventually(lambda: h.ledger_entry(message_id, state), timeout=15)
    return found


async def test_an_internationalized_address_goes_with_smtputf8(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:  # the sink offers SMTPUTF8
        await h.create_template(RECEIPT)
        await send(h, "m-u1", "José <josé@example.com>")
        await h.wait_status("m-u1", "delivered")
        assert [m.envelope_to for m in h.sink.messages] == [["josé@example.com"]]
        # RFC 6532: the address as UTF-8 in the header too (the name encoded as ever).
        assert "To: =?utf-8?b?Sm9zw6k=?= <josé@example.com>\r\n".encode() in h.sink.messages[0].raw


async def test_an_address_with_an_invisible_character_fails_at_once(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(RECEIPT)
        for n, address in enumerate(
            ["ann@example.com\u200b", "ann\u00ad@example.com", "ann@exam\x01ple.com"]
        ):
            await send(h, f"m-z{n}", address)
            got = await entry(h, f"m-z{n}", "failed")
            assert got["attempts"] == 1 and got["next_attempt_at"] is None
            assert got["reason"] == f"no email address for the customer: not a mailbox ({RULE})"
        assert h.sink.messages == []


async def test_a_server_without_smtputf8_fails_such_mail_at_once_and_stays_open(start_notifier) -> None:  # type: ignore[no-untyped-def]
    ascii_only = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    try:
        async with start_notifier(smtp_port=ascii_only.port) as h:  # circuit_failure_threshold=3
            await h.create_template(RECEIPT)
            for n in range(4):
                await send(h, f"m-x{n}", f"josé{n}@example.com")
            for n in range(4):
                got = await entry(h, f"m-x{n}", "failed")
                # Failed for good at the first attempt, as the message's fault: not a bounce of the
                # address, not a provider outage retried for ~18 minutes.
                assert (got["attempts"], got["provider"]) == (1, "smtp")
                assert got["reason"] == f"SMTP: {NO_SMTPUTF8}"
            breaker = h.app.state.notifier.router.routes[Channel.EMAIL][0].breaker
            assert not breaker.is_open and breaker.failures == 0
            await send(h, "m-ok", "ok@example.com")
            await h.wait_status("m-ok", "delivered")
            assert [m.envelope_to for m in ascii_only.messages] == [["ok@example.com"]]
            gone = await h.client.get(
                "/v1/suppressions", params={"channel": "email", "address": "josé0@example.com"}, headers=ADMIN
            )
            assert gone.status_code == 404
    finally:
        await ascii_only.stop()


async def test_a_display_name_with_a_comma_reaches_the_mailbox_as_one_address(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """`"Doe, John" <john@example.com>` went out as `To: Doe, John <john@example.com>`: two addresses
    to a mail client. Through the whole path (request, ledger, SMTP), the `To` parsed back is one."""
    async with start_notifier() as h:
        await h.create_template(RECEIPT)
        await send(h, "m-n1", '"Doe, John" <john@example.com>')
        await h.wait_status("m-n1", "delivered")
        [mail] = h.sink.messages
        assert mail.envelope_to == ["john@example.com"]
        assert b'To: "Doe, John" <john@example.com>\r\n' in mail.raw
        to = mail.message["To"]
        assert [(a.display_name, a.addr_spec) for a in to.addresses] == [("Doe, John", "john@example.com")]


async def test_a_server_without_smtputf8_delivers_a_domain_beyond_ascii_as_a_labels(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """`user@bücher.example` failed at once on such a server; its domain has an ASCII form, the same
    mail domain (IDNA A-labels), so it is delivered. Its bounce suppresses the address as written:
    the next message to it is suppressed, not sent."""
    ascii_only = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    ascii_only.reject.add("gone@xn--bcher-kva.example")
    try:
        async with start_notifier(smtp_port=ascii_only.port) as h:
            await h.create_template(RECEIPT)
            await send(h, "m-i1", "Jürgen Doe <user@Bücher.example>")
            await h.wait_status("m-i1", "delivered")
            [mail] = ascii_only.messages
            assert mail.envelope_to == ["user@xn--bcher-kva.example"] and mail.raw.isascii()
            to = mail.message["To"]
            assert [(a.display_name, a.addr_spec) for a in to.addresses] == [
                ("Jürgen Doe", "user@xn--bcher-kva.example")
            ]

            await send(h, "m-i2", "gone@bücher.example")
            await h.wait_status("m-i2", "bounced")
            gone = await h.client.get(
                "/v1/suppressions",
                params={"channel": "email", "address": "gone@bücher.example"},
                headers=ADMIN,
            )
            assert gone.status_code == 200 and gone.json()["suppressed"] is True
            await send(h, "m-i3", "Gone@Bücher.example")
            statuses = await h.wait_status("m-i3", "suppressed")
            assert "SMTP 550 5.1.1" in statuses[-1]["reason"]
            assert len(ascii_only.messages) == 1
    finally:
        await ascii_only.stop()
