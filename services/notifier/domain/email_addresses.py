"""Email addresses as CLM compares them: the mailbox a message goes to, in lower case.

Profiles and requests hold addresses as clients wrote them (`Ann <Ann@Example.com>`,
` ann@example.com`, `<ANN@example.com>`); the SMTP envelope gets the mailbox parsed out of that
(aiosmtplib parses it the same way). So one form for all of them: a spam complaint, a hard bounce or
an erasure about `ann@example.com` applies however the address was written. Lower case because mail
systems treat local parts without case in practice. A domain beyond ASCII is one mail domain in two
writings, its U-labels (`bücher.example`) and its IDNA A-labels (`xn--bcher-kva.example`, what an
SMTP server without SMTPUTF8 is given, so what its bounces and a relay's complaints name): keyed by
the U-labels (`canonical_domain`).
"""

from __future__ import annotations

import re
import unicodedata
from email.utils import parseaddr

import idna

# RFC 5321: a local part of 64 octets, a domain of 255; longer is no address (and would not fit an
# index entry either).
MAX_LENGTH = 320
# What a mailbox is, for the reasons that refuse one.
RULE = "a mailbox with an @, at most 320 characters, without spaces or control or invisible characters"

# A quoted local part (`"ann smith"@example.com`) may hold spaces; nothing else may (as aiosmtplib,
# which refuses to write such an address on an SMTP command line).
_QUOTED_LOCAL_PART = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def mailbox(value: str) -> str | None:
    """The mailbox of an address as written, in lower case with its domain's valid A-labels as their
    U-labels (`canonical_domain`: `Ann@XN--BCHER-KVA.example` is `ann@bücher.example`); None when
    there is none (no `@`, longer than an address can be, or holding a character no mail system
    delivers to: see `_unsendable`)."""
    address = _address(value)
    if address is None:
        return None
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{canonical_domain(domain)}"


def mailboxes(value: str) -> list[str]:
    """The forms an address's keys may have been made from, for looking them up: its `mailbox`; the
    address lower-cased as written; and, when its domain is beyond ASCII, the A-label writing of it.
    Before A-labels were decoded (2026-12-08) keys were made from the address as written, so a
    suppression, complaint or tombstone made from `ann@xn--bcher-kva.example` (a relay's bounce, a
    feedback loop) still holds for `ann@bücher.example`, and the other way round. New keys are made
    from `mailbox` only."""
    address = _address(value)
    if address is None:
        return []
    local, _, domain = address.rpartition("@")
    canonical = canonical_domain(domain)
    forms = [f"{local.lower()}@{canonical}", address.lower()]
    if not canonical.isascii() and (a_labels := _a_label_domain(canonical)) is not None:
        forms.append(f"{local.lower()}@{a_labels}")
    return list(dict.fromkeys(forms))


def _a_label_domain(canonical: str) -> str | None:
    # Only labels `_u_label` could have decoded (valid IDNA 2008): one that is not (full-width
    # letters, an emoji) was never written as an A-label that CLM keyed.
    labels = []
    for label in canonical.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except UnicodeError:  # idna.IDNAError, and codec errors
            return None
    return ".".join(labels)


def _address(value: str) -> str | None:
    # Whitespace around it is the writing, not the address, a no-break space included
    # (`Ann@Example.com` + U+00A0 is `ann@example.com`, as the SMTP envelope gets it:
    # `channels.smtp._envelope` strips it the same way); inside, it is none.
    address = parseaddr(value.strip())[1].strip()
    if "@" not in address or len(address) > MAX_LENGTH or _unsendable(address):
        return None
    return address


def canonical_domain(domain: str) -> str:
    """A mail domain in the one form CLM keys it by: lower case, each label that is a valid IDNA 2008
    A-label (`xn--bcher-kva`, any case) as its U-label (`bücher`), so the two writings of one domain
    are one key. Valid: it decodes (`idna.decode`, which checks the U-label against IDNA 2008) and
    encodes back to itself (`xn--abc-` or `xn--zz` do not), and its U-label holds nothing `_unsendable`
    refuses (a zero-width joiner, which IDNA 2008 allows in some labels). Any other label stays as
    written, lower-cased: a U-label is not mapped (UTS 46 would map full-width letters to ASCII,
    which `ascii_mailbox` refuses for that reason)."""
    low = domain.lower()
    if "xn--" not in low:
        return low
    return ".".join(_u_label(label) for label in low.split("."))


def _u_label(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        decoded = idna.decode(label)
        valid = idna.encode(decoded) == label.encode("ascii")
    except UnicodeError:  # idna.IDNAError, and codec errors
        return label
    return decoded if valid and not _unsendable(decoded) else label


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


# Whose mailbox has no ASCII form (`ascii_mailbox`), in the reason: the recipient's, or the sender's,
# which is configuration (every message from it fails so), not the customer's address.
RECIPIENT = "the email address"
SENDER = "the sender address (CLM_SMTP_SENDER or the email provider's sender)"


def local_part_beyond_ascii(whose: str) -> str:
    return (
        f"{whose} has characters other than ASCII before its @ and the SMTP server does not offer "
        "SMTPUTF8 (RFC 6531): it cannot be sent there"
    )


def domain_without_idna(whose: str) -> str:
    return (
        f"the domain of {whose} has characters other than ASCII and no IDNA 2008 form (xn--) as it is "
        "written, and the SMTP server does not offer SMTPUTF8 (RFC 6531): it cannot be sent there"
    )


# Why a recipient's mailbox has no ASCII form, as an SMTP server without SMTPUTF8 needs one.
LOCAL_PART_BEYOND_ASCII = local_part_beyond_ascii(RECIPIENT)
DOMAIN_WITHOUT_IDNA = domain_without_idna(RECIPIENT)


class NoAsciiForm(ValueError):
    """A mailbox without an ASCII form; `reason` says whose and why (`local_part_beyond_ascii`,
    `domain_without_idna`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ascii_mailbox(mailbox: str, whose: str = RECIPIENT) -> str:
    """A mailbox (`local@domain`, no display name) as an SMTP server without SMTPUTF8 can take it: as is
    when ASCII; with a domain beyond ASCII (`ann@bücher.example`) and an ASCII local part, the domain
    as IDNA 2008 A-labels (`ann@xn--bcher-kva.example`: the same mail domain in DNS, RFC 5890),
    through the `idna` package with UTS 46 mapping (which lower-cases). NoAsciiForm when the local
    part is beyond ASCII (no encoding of it exists without SMTPUTF8), or the domain has no A-label
    form as written: a character IDNA 2008 does not allow (`☃.net`), or one UTS 46 maps to another
    beyond lower case (`example.com` in full-width letters, U+FF45 ..., is `example.com`; `u` + a
    combining diaeresis is `ü`). Those would reach a mailbox whose suppressions, complaints and erasure are
    keyed under another form (`mailbox`), as the zero-width joiners `_unsendable` refuses would."""
    if mailbox.isascii():
        return mailbox
    local, at, domain = mailbox.rpartition("@")
    if not at or not local.isascii():
        raise NoAsciiForm(local_part_beyond_ascii(whose))
    try:
        alabels = idna.encode(domain, uts46=True).decode("ascii")
        # Compared with the key's form, label by label: a label already in A-labels, in any case
        # (`XN--BCHER-KVA.bücher.example`), is that same domain.
        same = idna.decode(alabels) == canonical_domain(domain)
    except UnicodeError as exc:  # idna.IDNAError, and codec errors
        raise NoAsciiForm(domain_without_idna(whose)) from exc
    if not same:
        raise NoAsciiForm(domain_without_idna(whose))
    return f"{local}@{alabels}"
