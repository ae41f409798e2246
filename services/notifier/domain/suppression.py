"""Addresses no message goes to any more: the provider refused the mailbox, number or push token for
good (a hard bounce: it does not exist; or Twilio 21610: the number replied STOP to our sender).
Sending again would only be refused again, and mail providers judge a sender by how often it mails
addresses that do not exist.

Kept by address, not by customer: whichever customer (or request override) names the address, the
message is `suppressed`, of any category (a password reset to a mailbox that does not exist bounces
too). Until an operator removes the address (`DELETE /v1/suppressions/{id}`), say because the
mailbox was set up again, or for 21610 the number replies START. Keyed by a salted hash of the
address in one form (`address_key`), never the address, as SMS STOPs are.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from services.notifier.domain.email_addresses import mailbox, mailboxes
from services.notifier.domain.phone_numbers import normalized as e164
from shared.contracts import Channel

# Who reported an imported suppression or a complaint: a short lower-case name (ses, sendgrid), never
# words. It outlives an erasure (an entry, a consent ledger entry), and free text could quote an address.
SOURCE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,31}$"

# Channels whose addresses a provider can report as not existing.
SUPPRESSIBLE = (Channel.EMAIL, Channel.SMS, Channel.PUSH)

# RFC 3463 enhanced status codes: X.1.1 bad mailbox, X.1.2 bad domain, X.1.3 bad mailbox syntax,
# X.1.6 mailbox moved (no forwarding address), X.1.10 null MX (RFC 7505), X.2.1 mailbox disabled.
# (A sentence may end right after the code: `... 5.1.1.`; an IP address is no code.)
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_ADDRESS_GONE = {("1", "1"), ("1", "2"), ("1", "3"), ("1", "6"), ("1", "10"), ("2", "1")}


def smtp_address_gone(code: int, text: str) -> str | None:
    """For the server's refusal of a recipient (RCPT): the codes that say the address does not exist
    (`SMTP 550 5.1.1`), else None. Only an enhanced code says so: a bare 550 is as often "relaying
    denied" (the relay refusing us, for every recipient) as "no such user", and a 5.7.x code blocks
    the message (policy, spam), a 5.2.2 is a full mailbox: those bounce that message only. Never the
    server's words, which often quote the address."""
    if code < 500:
        return None
    enhanced = _ENHANCED.search(text)
    if enhanced is None:
        return None
    klass, subject, detail = enhanced.groups()
    if klass != "5" or (subject, detail) not in _ADDRESS_GONE:
        return None
    return f"SMTP {code} {klass}.{subject}.{detail}"


def address_form(channel: Channel, address: str, sms_default_region: str | None) -> str | None:
    """The one form of an address its key is made from: an email address's mailbox in lower case
    (`domain.email_addresses`), a phone number in E.164, a push token as given. None: not an address
    of a suppressible channel."""
    text = address.strip()
    if not text:
        return None
    if channel is Channel.EMAIL:
        return mailbox(text)
    if channel is Channel.SMS:
        return e164(text, sms_default_region)
    if channel is Channel.PUSH:
        return text
    return None


def lookup_forms(channel: Channel, address: str, sms_default_region: str | None) -> list[str]:
    """The forms keys of an address may have been made from, to look them up: `address_form`, and for
    an email address whose domain was written as A-labels the form before they were decoded
    (`email_addresses.mailboxes`: keys made before 2026-12-08 still hold). Empty: not an address."""
    if channel is Channel.EMAIL:
        return mailboxes(address.strip())
    form = address_form(channel, address, sms_default_region)
    return [form] if form is not None else []


def address_key(salt: str, channel: Channel, form: str) -> str:
    """The salted hash an address is kept under (`address_form` gives `form`)."""
    return hmac.new(salt.encode(), f"{channel.value}:{form}".encode(), hashlib.sha256).hexdigest()


def suppression_key(salt: str, channel: Channel, address: str, sms_default_region: str | None) -> str | None:
    form = address_form(channel, address, sms_default_region)
    return address_key(salt, channel, form) if form is not None else None


def lookup_keys(salt: str, channel: Channel, address: str, sms_default_region: str | None) -> list[str]:
    """The keys an address's suppression or opt-out may be kept under (`lookup_forms`), the first its
    `suppression_key`; empty: not an address."""
    return [address_key(salt, channel, f) for f in lookup_forms(channel, address, sms_default_region)]
