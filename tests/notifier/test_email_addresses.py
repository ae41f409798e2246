"""Email addresses beyond ASCII: an internationalized mailbox goes with SMTPUTF8 where the server
offers it and fails at once where it does not; an address with an invisible character pasted in
fails at once as no mailbox. Neither is retried as a provider outage, and neither opens the SMTP
circuit for everyone else's mail (five of them did, for `circuit_cooldown_s`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from deploy.local.smtp_sink import MailSink
from services.notifier.channels.smtp import NO_SMTPUTF8
from services.notifier.domain.email_addresses import RULE
from services.notifier.domain.suppression import address_key
from services.notifier.store import consent_repo, suppressions_repo
from services.notifier.store.suppressions_repo import Suppression
from shared.contracts import Channel
from shared.privacy import add_tombstones
from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.test_links_after_erasure import erase
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


PROMO = {**RECEIPT, "id": "promo", "name": "Promo"}
MARKETING = {"category": "marketing", "subscription_topic": "news"}
OPTED_OUT = "the address opted out of email marketing (a spam complaint)"


def suppressed_reason(why: str) -> str:
    return f"the email address is suppressed: a provider refused it before ({why}; see /v1/suppressions)"


async def test_feedback_about_the_a_label_form_reaches_the_address_as_stored(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """A server without SMTPUTF8 gets `ann@xn--bcher-kva.example` for the profile's
    `ann@bücher.example`, so its relay's complaint (a feedback loop) and bounce list name that form.
    Both were kept under another key than the address as stored: nobody was opted out, and the next
    message went out. One key for both writings of the domain (its U-labels) now."""
    ascii_only = await MailSink.start(server_options={"enable_SMTPUTF8": False})
    try:
        async with start_notifier(smtp_port=ascii_only.port) as h:
            await h.create_template(RECEIPT)
            await h.create_template(PROMO)
            await h.create_topic("news", ["email"])
            await h.profile("c-ann", {"email": "Ann <ann@bücher.example>"})
            await h.wait_contact("c-ann")
            await h.publish(request("m-a1", "c-ann", "email", "promo", **MARKETING))
            await h.wait_status("m-a1", "delivered")
            [mail] = ascii_only.messages
            sent_as = mail.envelope_to[0]
            assert sent_as == "ann@xn--bcher-kva.example"

            # The relay names the recipient as it was given to it (in any case).
            complained = await h.client.post(
                "/v1/complaints", headers=ADMIN, json={"source": "ses", "addresses": [sent_as.upper()]}
            )
            assert complained.status_code == 200, complained.text
            # The customer whose profile holds the U-label form is found and opted out.
            statuses = await h.wait_status("m-a1", "unsubscribed")
            assert statuses[-1]["reason"] == "complaint (ses): all marketing on email"
            found = await h.client.get(
                "/v1/complaints", params={"address": "ann@bücher.example"}, headers=ADMIN
            )
            assert found.status_code == 200, found.text
            assert found.json()["id"] == complained.json()["complaints"][0]["id"]
            # Marketing to the address from anyone (an override recipient) stops.
            await h.publish(
                request(
                    "m-a2",
                    "c-other",
                    "email",
                    "promo",
                    recipient={"email": "ann@Bücher.example"},
                    **MARKETING,
                )
            )
            statuses = await h.wait_status("m-a2", "suppressed")
            assert statuses[-1]["reason"] == OPTED_OUT

            imported = await h.client.post(
                "/v1/suppressions",
                headers=ADMIN,
                json={
                    "source": "ses",
                    "suppressions": [{"channel": "email", "address": "bob@XN--BCHER-KVA.example"}],
                },
            )
            assert imported.status_code == 200, imported.text
            looked_up = await h.client.get(
                "/v1/suppressions",
                params={"channel": "email", "address": "Bob@bücher.example"},
                headers=ADMIN,
            )
            assert looked_up.status_code == 200, looked_up.text
            assert looked_up.json()["id"] == imported.json()["suppressions"][0]["id"]
            await send(h, "m-b1", "Bob <bob@bücher.example>")
            statuses = await h.wait_status("m-b1", "suppressed")
            assert statuses[-1]["reason"] == suppressed_reason("imported from ses")
            assert len(ascii_only.messages) == 1  # nothing more went out
    finally:
        await ascii_only.stop()


async def test_keys_made_from_the_a_label_form_before_still_hold(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Before, `cy@xn--bcher-kva.example` was keyed as written (lower case): its bounce, complaint
    or tombstone kept under that key must still stop mail to the address written so, now that its
    key is the U-label form's. (Salted hashes cannot be re-keyed: both keys are looked up.)"""
    async with start_notifier() as h:
        await h.create_template(RECEIPT)
        await h.create_template(PROMO)
        await h.create_topic("news", ["email"])
        salt = h.settings.privacy_salt.get_secret_value()
        earlier = address_key(salt, Channel.EMAIL, "cy@xn--bcher-kva.example")
        complained = address_key(salt, Channel.EMAIL, "dee@xn--bcher-kva.example")
        now = datetime.now(UTC)
        async with h.platform.unit_of_work() as uow:
            await suppressions_repo.add(
                uow.session, [Suppression(earlier, "email", "SMTP 550 5.1.1", "smtp", None, now)]
            )
            await consent_repo.add_email_address_optouts(uow.session, [complained], source="ses", now=now)
            await add_tombstones(uow.session, salt, ["eve@xn--bcher-kva.example"], "erase-eve", now)

        await send(h, "m-c1", "Cy <Cy@XN--bcher-kva.example>")
        statuses = await h.wait_status("m-c1", "suppressed")
        assert statuses[-1]["reason"] == suppressed_reason("SMTP 550 5.1.1")
        await h.publish(
            request(
                "m-d1", "c-d", "email", "promo", recipient={"email": "dee@xn--bcher-kva.example"}, **MARKETING
            )
        )
        statuses = await h.wait_status("m-d1", "suppressed")
        assert statuses[-1]["reason"] == OPTED_OUT
        await send(h, "m-e1", "Eve <eve@XN--BCHER-KVA.example>")
        statuses = await h.wait_status("m-e1", "suppressed")
        assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]
        # Looked up by the address as written, the entries are found, under the keys they have.
        cy = await h.client.get(
            "/v1/suppressions",
            params={"channel": "email", "address": "cy@xn--bcher-kva.example"},
            headers=ADMIN,
        )
        assert cy.status_code == 200 and cy.json()["id"] == earlier
        dee = await h.client.get(
            "/v1/complaints", params={"address": "dee@xn--bcher-kva.example"}, headers=ADMIN
        )
        assert dee.status_code == 200 and dee.json()["id"] == complained
        # The usual case: the profile holds the U-label writing, the old entry was made from the
        # A-label one a relay without SMTPUTF8 had been given.
        await send(h, "m-c2", "Cy <cy@bücher.example>")
        statuses = await h.wait_status("m-c2", "suppressed")
        assert statuses[-1]["reason"] == suppressed_reason("SMTP 550 5.1.1")
        await h.publish(
            request("m-d2", "c-d", "email", "promo", recipient={"email": "Dee@Bücher.example"}, **MARKETING)
        )
        statuses = await h.wait_status("m-d2", "suppressed")
        assert statuses[-1]["reason"] == OPTED_OUT
        await send(h, "m-e2", "eve@bücher.example")
        statuses = await h.wait_status("m-e2", "suppressed")
        assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]
        assert h.sink.messages == []


async def test_an_erasure_covers_both_writings_of_a_domain(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The profile held `fay@xn--bcher-kva.example`; its erasure tombstones the mailbox, now the
    U-label form: a request under another customer id to either writing is the erased person's."""
    async with start_notifier() as h:
        await h.create_template(RECEIPT)
        await h.profile("c-fay", {"email": "Fay <fay@XN--BCHER-KVA.example>"})
        await h.wait_contact("c-fay")
        await erase(h, "c-fay", ["c-fay"])  # the address only from the notifier's contact
        await send(h, "m-f1", "fay@bücher.example")
        await send(h, "m-f2", "Fay <fay@xn--bcher-kva.example>")
        for message_id in ("m-f1", "m-f2"):
            statuses = await h.wait_status(message_id, "suppressed")
            assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]
        assert h.sink.messages == []
