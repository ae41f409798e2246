"""Email addresses as CLM compares them: the mailbox a message goes to, in lower case.

Profiles and requests hold addresses as clients wrote them (`Ann <Ann@Example.com>`,
` ann@example.com`, `<ANN@example.com>`); the SMTP envelope gets the mailbox parsed out of that
(aiosmtplib parses it the same way). So one form for all of them: a spam complaint, a hard bounce or
an erasure about `ann@example.com` applies however the address was written. Lower case because mail
systems treat local parts without case in practice.
"""

from __future__ import annotations

from email.utils import parseaddr

# RFC 5321: a local part of 64 octets, a domain of 255; longer is no address (and would not fit an
# index entry either).
MAX_LENGTH = 320


def mailbox(value: str) -> str | None:
    """The mailbox of an address as written, in lower case; None when there is none (no `@`, or
    longer than an address can be)."""
    address = parseaddr(value)[1].strip().lower()
    if "@" not in address or len(address) > MAX_LENGTH:
        return None
    return address
