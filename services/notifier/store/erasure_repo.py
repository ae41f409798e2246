"""Erased customers in the notifier: tombstones (salted hashes) and suppressing what is requested later.

Kept apart from `privacy_repo` (erasure and export of what is held): this is what keeps messages
from reaching a customer after the erasure.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.suppression import address_form, lookup_forms
from services.notifier.store import contacts_repo
from shared.contracts import Channel, MessageRequested
from shared.privacy import add_tombstones

ERASED_REASON = "erased"

# The request keeps no personal data (recipient, template data) once it is known to be for an erased
# customer; the row stays so a redelivered request is recognized and not sent either. A `claimed` row
# is safe to stop too: its worker's `sending` mark then fails and nothing is sent.
_SUPPRESS = sa.text(
    "UPDATE send_ledger SET state = 'suppressed', reason = :reason, next_attempt_at = NULL, "
    "request = jsonb_set(jsonb_set(request, '{recipient}', '{}'), '{data}', '{}'), updated_at = :now "
    "WHERE message_id = ANY(CAST(:ids AS text[])) AND state IN ('pending', 'claimed') "
    "RETURNING message_id"
)


def request_identities(r: MessageRequested, sms_default_region: str | None = None) -> list[str]:
    """What a request is addressed by: its customer id, and the address its channel would go to
    (the recipient's email for an email, phone for an SMS), also in the form the erasure kept it in
    (`address_forms`): `Eve@Example.com` and `+1 (555) 010-9999` are the erased `eve@example.com`
    and `+15550109999`, and `eve@xn--bcher-kva.example` is the erased `eve@bücher.example`. (Not
    the other channel's address: a phone shared with an erased customer must not stop another
    customer's email.)"""
    found = [r.customer_id]
    if r.channel is Channel.EMAIL and r.recipient.email:
        email = r.recipient.email
        # Also lower-cased whole: the form tombstones had before they kept the mailbox (2026-12-07);
        # and one written with A-labels as it was keyed before they were decoded (`lookup_forms`).
        found += [email, email.strip().lower(), *lookup_forms(Channel.EMAIL, email, sms_default_region)]
    if r.channel is Channel.SMS and r.recipient.phone:
        found += [r.recipient.phone, *address_forms(None, r.recipient.phone, sms_default_region)]
    return list(dict.fromkeys(i for i in found if i))


async def tombstone_addresses(
    session: AsyncSession,
    salt: str,
    customer_ids: Sequence[str],
    sms_default_region: str | None,
    request_id: str,
    now: datetime,
) -> None:
    """Tombstone the customers' contact addresses in the forms requests are checked in: an erasure
    comes both as a privacy request and as the profile's `erased` announcement, on two topics, and
    whichever is handled first still finds the contact (the other deletes it)."""
    contacts = await contacts_repo.get_many(session, set(customer_ids))
    forms = [
        form
        for c in contacts.values()
        for phone in {c.phone_e164, c.phone}
        for form in address_forms(c.email, phone, sms_default_region)
    ]
    await add_tombstones(session, salt, forms, request_id, now)


def address_forms(email: str | None, phone: str | None, sms_default_region: str | None) -> list[str]:
    """An email address in lower case and a phone number in E.164 (`domain.suppression.address_form`,
    as suppressions key them): the forms a customer's addresses are tombstoned in on erasure, and a
    request's recipient is checked in."""
    forms = [
        address_form(channel, address, sms_default_region) if address else None
        for channel, address in ((Channel.EMAIL, email), (Channel.SMS, phone))
    ]
    return [f for f in forms if f]


def addressed_to_erased(
    requests: Sequence[MessageRequested], erased: set[str], sms_default_region: str | None = None
) -> list[MessageRequested]:
    """The requests addressed to an erased customer (`erased`: their identifiers, as
    `shared.privacy.erased_identities` gives them): by customer id, or by recipient email/phone."""
    if not erased:
        return []
    return [r for r in requests if erased.intersection(request_identities(r, sms_default_region))]


async def suppress(session: AsyncSession, message_ids: Sequence[str], now: datetime) -> set[str]:
    if not message_ids:
        return set()
    rows = await session.execute(_SUPPRESS, {"ids": list(message_ids), "reason": ERASED_REASON, "now": now})
    return {r[0] for r in rows}
