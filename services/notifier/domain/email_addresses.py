"""Email addresses as CLM compares them: the mailbox a message goes to, in lower case.

Profiles and requests hold addresses as clients wrote them (`Ann <Ann@Example.com>`,
` ann@example.com`, `<ANN@example.com>`); the SMTP envelope gets the mailbox parsed out of that
(aiosmtplib parses it the same way). So one form for all of them: a spam complaint, a hard bounce or
an erasure about `ann@example.com` applies however the address was written. Lower case because mail
systems treat local parts without case in practice.
"""

from __future__ import annotations

import re
import unicodedata
from email.utils import parseaddr

# RFC 5321: a local part of 64 octets, a domain of 255; longer is no address (and would not fit an
# index entry either).
MAX_LENGTH = 320
# What a mailbox is, for the reasons that refuse one.
RULE = "a mailbox with an @, at most 320 characters, without spaces or control or invisible characters"

# A quoted local part (`"ann smith"@example.com`) may hold spaces; nothing else may (as aiosmtplib,
# which refuses to write such an address on an SMTP command line).
_QUOTED_LOCAL_PART = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def mailbox(value: str) -> str | None:
    """The mailbox of an address as written, in lower case; None when there is none (no `@`, longer
    than an address can be, or holding a character no mail system delivers to: see `_unsendable`)."""
    # Whitespace around it is the writing, not the address, a no-break space included
    # (`Ann@Example.com` + U+00A0 is `ann@example.com`, as the SMTP envelope gets it:
    # `channels.smtp._envelope` strips it the same way); inside, it is none.
    address = parseaddr(value.strip())[1].strip()
    if "@" not in address or len(address) > MAX_LENGTH or _unsendable(address):
        return None
    return address.lower()


def _unsendable(address: str) -> bool:
    """A control character, an invisible one (a zero-width space pasted with the address, a
    direction mark, a soft hyphen: Unicode format characters), a surrogate, private-use or unassigned
    code point anywhere; a space, `<`, `>` or `"` outside a quoted local part. Letters of any script
    are fine (`josé@example.com`: an SMTPUTF8 address).

    A zero-width joiner or non-joiner (U+200D, U+200C) too, in the domain as well: IDNA2008 allows
    them in some labels (RFC 5892 CONTEXTJ), but UTS-46 transitional processing (IDNA2003, still
    what some resolvers and mail systems apply) drops them, so `ann@exa<U+200D>mple.com` may reach
    `ann@example.com`: kept, it would be a second key for that mailbox's suppressions, complaints
    and erasure."""
    if any(unicodedata.category(c)[0] == "C" for c in address):
        return True
    rest = _QUOTED_LOCAL_PART.sub("", address, count=1)
    return any(c.isspace() or unicodedata.category(c)[0] == "Z" or c in '<>"' for c in rest)
