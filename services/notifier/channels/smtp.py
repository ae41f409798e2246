"""Email over SMTP (aiosmtplib) with a small pool of open connections."""

from __future__ import annotations

import asyncio
import contextlib
from email.utils import parseaddr

import aiosmtplib
from aiosmtplib.email import parse_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

from services.notifier.channels.base import BeforeCall, CallProgress, Delivery, SendAborted, SendResult
from services.notifier.domain.email_addresses import (
    LOCAL_PART_BEYOND_ASCII,
    SENDER,
    NoAsciiForm,
    ascii_mailbox,
)
from services.notifier.domain.retry_policy import Failure
from services.notifier.domain.suppression import smtp_address_gone
from services.notifier.settings import ProviderConfig

# RFC 6531: an envelope address with characters other than ASCII goes only to a server offering this,
# or, with only its domain beyond ASCII, as IDNA A-labels (`email_addresses.ascii_mailbox`).
SMTPUTF8 = "SMTPUTF8"
NO_SMTPUTF8 = LOCAL_PART_BEYOND_ASCII
UNWRITABLE = (
    "the email address cannot be written on an SMTP command line "
    "(a space, <, > or a character that cannot be encoded)"
)


def _envelope(value: str) -> str:
    """The mailbox written on MAIL FROM / RCPT TO for an address as written, as aiosmtplib parses it:
    the address without its display name (`José <jose@example.com>` -> `jose@example.com`), nor the
    whitespace around it. ValueError when it cannot be written there at all (a space or `<` outside
    quotes, a lone surrogate)."""
    # Whitespace around the mailbox (a no-break space pasted with it) is not the address, as for
    # `domain.email_addresses.mailbox`, which keys suppressions and erasures by this form.
    written = value.strip()
    address = parse_address(parseaddr(written)[1].strip() or written)  # validated as aiosmtplib does
    address.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return address


def _message_failure(code: int) -> Failure:
    """A refusal of the recipient (RCPT) or of the message (DATA)."""
    if code in (550, 551, 553, 554):
        return Failure.BOUNCE
    if 400 <= code < 500:
        return Failure.TRANSIENT
    if code in (530, 535):
        return Failure.PROVIDER
    return Failure.PERMANENT


# A refusal at RCPT that says the relay will not work for us, whoever the recipient: the client
# (our host), our HELO, our sender, or relaying for us at all. Servers answer these at RCPT, not
# earlier: Postfix by default (`smtpd_delay_reject = yes`) holds its client, HELO and sender
# restrictions until RCPT TO. Matched in the server's text, case-insensitively:
RELAY_REFUSES_US = (
    "relay access denied",  # Postfix reject_unauth_destination; Microsoft 365 5.7.64 TenantAttribution
    "relaying denied",  # Sendmail
    "relay not permitted",  # Exim's default ACL
    "unable to relay",  # Exchange, Microsoft 365 (5.7.54 "Unable to relay recipient in non-accepted domain")
    "client host rejected",  # Postfix smtpd_client_restrictions (our host, its reverse DNS)
    "helo command rejected",  # Postfix smtpd_helo_restrictions
    "sender address rejected",  # Postfix smtpd_sender_restrictions (our envelope sender)
    "sender verify failed",  # Exim verify = sender
    # A DNS blocklist naming our host (Postfix, Microsoft 365: "Client host [...] blocked using ...").
    "blocked using",
    "banned sending ip",  # Microsoft 365 5.7.606-5.7.649 "Access denied, banned sending IP"
)


def _recipient_failure(code: int, text: str) -> Failure:
    """A refusal at RCPT: the recipient's (`_message_failure`: 550 5.1.1 user unknown bounces),
    unless its text says the relay refuses us (`RELAY_REFUSES_US`): then, as a refusal before any
    recipient, the server's (`PROVIDER`: another relay may take it, the breaker counts it; a 4xx
    stays transient), never a bounce nor the address's."""
    if code >= 500 and any(words in text.lower() for words in RELAY_REFUSES_US):
        return Failure.PROVIDER
    return _message_failure(code)


def _refused_recipient(code: int, text: str) -> SendResult:
    failure = _recipient_failure(code, text)
    return SendResult.failed(
        failure,
        f"SMTP recipient refused: {text}",
        # The relay's refusal of us says nothing of the address.
        address_gone=smtp_address_gone(code, text) if failure is not Failure.PROVIDER else None,
    )


def _server_failure(exc: aiosmtplib.SMTPResponseException) -> Failure:
    """A refusal before any recipient: the greeting, EHLO/HELO, STARTTLS, AUTH or MAIL FROM. The
    server refuses to work for us (our host blocked, our credentials or sender refused), whoever the
    message is for: another provider may take it, and the breaker counts it. Except a MAIL FROM 552,
    which is the message's size (RFC 1870), refused anywhere."""
    if isinstance(exc, aiosmtplib.SMTPSenderRefused) and exc.code == 552:
        return Failure.PERMANENT
    return Failure.TRANSIENT if 400 <= exc.code < 500 else Failure.PROVIDER


class SmtpProvider:
    # Open connections at most, whatever `concurrency` says (SMTP servers limit them per client:
    # Postfix's default is 50). A connection is held for the envelope, the `sending` commit and DATA,
    # ~40 ms when the host is busy: 16 capped the sends at ~400/s, below the rate single-post traffic
    # needed in bench-e2e (a backlog of seconds while connections were the only thing waited for).
    MAX_CONNECTIONS = 32

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(self.max_in_flight(config))

    @classmethod
    def max_in_flight(cls, config: ProviderConfig) -> int:
        return max(1, min(config.concurrency, cls.MAX_CONNECTIONS))

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.config.host,
            port=self.config.port,
            timeout=self.config.timeout_s,
            use_tls=self.config.use_tls,
            start_tls=self.config.start_tls,
            cert_bundle=self.config.ca_file,
        )
        await client.connect()
        if self.config.username and self.config.password is not None:
            try:
                await client.login(self.config.username, self.config.password.get_secret_value())
            except BaseException:
                client.close()  # connected, not pooled yet: nobody else would close it
                raise
        return client

    # Marks `progress` once DATA is answered 354, right before the message body: its point of no
    # return (see `router.ProviderRouter.send`).
    marks_progress = True

    async def send(
        self,
        delivery: Delivery,
        before_data: BeforeCall | None = None,
        progress: CallProgress | None = None,
    ) -> SendResult:
        """`before_data` runs before DATA (overlapping MAIL FROM and RCPT TO), and `progress` is marked
        once DATA is answered 354, right before the body: connecting, MAIL FROM, RCPT TO and DATA
        itself cannot deliver the message, so an error before that point leaves nothing ambiguous."""
        assert delivery.email is not None
        try:
            envelope = (_envelope(delivery.email.envelope_from), _envelope(delivery.to))
        except ValueError:
            # This message's address, never the server's doing: nowhere else would take it either.
            return SendResult.failed(Failure.PERMANENT, f"SMTP: {UNWRITABLE}")
        try:
            # Written once, before any command: a text that cannot be encoded (a lone surrogate a
            # template rendered) is this message's failure, found before any server is involved.
            wire = delivery.email.to_wire()
        except ValueError as exc:  # UnicodeEncodeError
            return SendResult.failed(
                Failure.PERMANENT, f"SMTP: the message cannot be encoded ({type(exc).__name__})"
            )
        # aiosmtplib encodes envelope addresses as ASCII unless told SMTPUTF8. Only the envelope
        # counts: a display name (`José <jose@example.com>`) goes in the To: header, RFC 2047 encoded,
        # so an ASCII mailbox needs no SMTPUTF8 whatever its name.
        utf8 = not all(address.isascii() for address in envelope)
        async with self._slots:
            client: aiosmtplib.SMTP | None = None
            try:
                client = self._idle.get_nowait() if not self._idle.empty() else await self._connect()
                if not client.is_connected:
                    client = await self._connect()
                if utf8 and not await self._offers_smtputf8(client):
                    try:
                        # Only the domains beyond ASCII: as A-labels (xn--), the same mail domain.
                        # The sender first: every message from it fails so, and the reason says so.
                        envelope = (ascii_mailbox(envelope[0], SENDER), ascii_mailbox(envelope[1]))
                        wire = delivery.email.with_ascii_domains().to_wire()
                        utf8 = False
                    except NoAsciiForm as exc:
                        # Nothing of the envelope went out: the connection is clean.
                        self._recycle(client)
                        return SendResult.failed(Failure.PERMANENT, f"SMTP: {exc.reason}")
                options = [SMTPUTF8] if utf8 else []
                response = await self._send_in_steps(client, wire, envelope, before_data, options, progress)
            except SendAborted:
                self._recycle(client)  # the envelope was reset: the connection is clean
                raise
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients[0] if exc.recipients else None
                code = refused.code if refused is not None else 550
                self._recycle(client)
                # The server's answer, not the exception's text (which names the address: personal data).
                return _refused_recipient(
                    code, f"{code} {refused.message}" if refused is not None else str(code)
                )
            except aiosmtplib.SMTPDataError as exc:
                self._recycle(client)
                # The message refused (content, size, policy): it says nothing of the address.
                return SendResult.failed(_message_failure(exc.code), f"SMTP {exc.code}: {exc.message}")
            except aiosmtplib.SMTPResponseException as exc:
                self._close(client)
                if progress is not None and progress.may_have_sent:
                    # A final reply that cannot be read (garbled, past aiosmtplib's 32 KB) after the
                    # body went out: the server may have taken the message. Outcome unknown (router).
                    raise
                # Before any recipient (the greeting, EHLO, STARTTLS, AUTH, MAIL FROM), or DATA
                # itself refused before its 354: the server, not this message or its address. (MAIL
                # FROM's RSET was sent; a fresh connection is simpler.)
                stage = "sender refused" if isinstance(exc, aiosmtplib.SMTPSenderRefused) else "refused"
                return SendResult.failed(_server_failure(exc), f"SMTP {stage}: {exc.code} {exc.message}")
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._close(client)
                if progress is not None and progress.may_have_sent:
                    # Once the body went out, the server may have taken the message (the answer to its end
                    # is what got lost): no failure to retry or fail over from. The router reports the
                    # outcome unknown, and counts it.
                    raise
                return SendResult.failed(Failure.TRANSIENT, f"SMTP connection: {type(exc).__name__}: {exc}")
            except BaseException:
                # Anything else (a bug, a cancelled task) may have left a command half answered: a pooled
                # connection in that state would confuse the next message's conversation.
                self._close(client)
                raise
            self._recycle(client)
            message_id = delivery.email.header("Message-ID")
            return SendResult(True, delivered=True, provider_message_id=message_id, reason=response[:200])

    @staticmethod
    async def _offers_smtputf8(client: aiosmtplib.SMTP) -> bool:
        # A fresh connection has not said EHLO yet (aiosmtplib says it before the first MAIL FROM);
        # as aiosmtplib does, HELO when EHLO is refused: no extensions then.
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not client.is_connected:
                    raise
                await client.helo()
        return client.supports_extension(SMTPUTF8)

    @staticmethod
    async def _send_in_steps(
        client: aiosmtplib.SMTP,
        wire: bytes,
        envelope: tuple[str, str],
        before_data: BeforeCall | None,
        options: list[str],
        progress: CallProgress | None,
    ) -> str:
        encoding = "utf-8" if options else "ascii"
        # The hook (a database commit) runs while MAIL FROM and RCPT TO go back and forth; DATA waits
        # for it. Overlapping them keeps the connection busy instead of idle during the commit.
        hook = asyncio.ensure_future(before_data()) if before_data is not None else None
        envelope_error: Exception | None = None
        try:
            await client.mail(envelope[0], options=options, encoding=encoding)
            await client.rcpt(envelope[1], encoding=encoding)
        except asyncio.CancelledError:
            if hook is not None:
                hook.cancel()
            raise
        except Exception as exc:
            envelope_error = exc
        if hook is not None:
            try:
                await hook
            except SendAborted:
                await SmtpProvider._reset(client)
                raise
        if isinstance(envelope_error, aiosmtplib.SMTPRecipientRefused):
            await SmtpProvider._reset(client)
            raise aiosmtplib.SMTPRecipientsRefused([envelope_error]) from envelope_error
        if isinstance(envelope_error, aiosmtplib.SMTPResponseException):
            await SmtpProvider._reset(client)
        if envelope_error is not None:
            raise envelope_error
        try:
            return (await SmtpProvider._data(client, wire, progress)).message
        except aiosmtplib.SMTPResponseException:
            await SmtpProvider._reset(client)
            raise

    @staticmethod
    async def _data(client: aiosmtplib.SMTP, wire: bytes, progress: CallProgress | None) -> SMTPResponse:
        """aiosmtplib's `SMTP.data` (5.1.3: `SMTPProtocol.execute_data_command`), split at the 354 to
        mark `progress` there, the point of no return: a relay that closes or times out on `DATA`
        itself (a restart, overload) never got the body, so that stays a transient failure, retried
        and failed over. Same replies, errors and timeouts as `data`, but for a refusal of `DATA`
        itself: the server has seen no body, so it refuses us, not the message (a plain
        `SMTPResponseException`, judged as the refusals before any recipient); a refusal of the
        message is `SMTPDataError`; a connection lost or timed out closes the client."""
        # EHLO was said before MAIL FROM (aiosmtplib's `mail`), as `data` would otherwise do.
        start = await client.execute_command(b"DATA")  # closes the client on a disconnect or timeout
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPResponseException(start.code, start.message)
        # The point of no return: once the body goes out, the server may take the message whatever
        # we see of its answer.
        if progress is not None:
            progress.sending()
        # As `execute_data_command` writes it: line endings made CRLF, leading dots doubled, the end.
        message = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(wire)) + b".\r\n"
        protocol = client.protocol
        try:
            lock = protocol._command_lock if protocol is not None else None
            if protocol is None or lock is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            async with lock:
                protocol._response_pending = True  # a reply is expected (see `execute_command`)
                protocol.write(message)
                response = await protocol.read_response(timeout=client.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()
            raise
        if response.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    @staticmethod
    async def _reset(client: aiosmtplib.SMTP) -> None:
        # As sendmail does: reset the envelope so the connection can be reused.
        with contextlib.suppress(aiosmtplib.SMTPException, ConnectionError):
            await client.rset()

    def _recycle(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None and client.is_connected:
            self._idle.put_nowait(client)

    @staticmethod
    def _close(client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            with contextlib.suppress(Exception):
                await client.quit()
