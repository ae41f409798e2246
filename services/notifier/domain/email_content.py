"""Builds the MIME email: text and HTML alternatives, tracked links, open pixel, RFC 8058 headers."""

from __future__ import annotations

import base64
import binascii
import html
import re
import uuid
from dataclasses import dataclass, replace
from email.utils import formatdate, parseaddr

from services.notifier.domain.email_addresses import RECIPIENT, SENDER, NoAsciiForm, ascii_mailbox
from services.notifier.domain.signing import MessageLinks

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"']+)\2""", re.IGNORECASE)


def track_links(body_html: str, message_id: str, links: MessageLinks) -> str:
    """Point every absolute http(s) link through the signed click redirect (not our own links)."""

    def rewrite(match: re.Match[str]) -> str:
        target = html.unescape(match.group(3))
        if links.is_own(target):
            return match.group(0)
        tracked = html.escape(links.click_url(message_id, target), quote=True)
        return f"{match.group(1)}{match.group(2)}{tracked}{match.group(2)}"

    return _HREF.sub(rewrite, body_html)


def add_open_pixel(body_html: str, pixel_url: str) -> str:
    pixel = (
        f'<img src="{html.escape(pixel_url, quote=True)}" width="1" height="1" alt="" style="display:none">'
    )
    closing = body_html.lower().rfind("</body>")
    if closing == -1:
        return body_html + pixel
    return body_html[:closing] + pixel + body_html[closing:]


@dataclass(frozen=True)
class ComposedEmail:
    """A multipart/alternative email (text + HTML), written straight to wire bytes.

    Hand-built rather than through `email.generator`: the stdlib generator's header folding and
    per-message regex compilation cost more than rendering and sending together.
    """

    headers: tuple[tuple[str, str], ...]
    text: str
    html: str
    envelope_from: str
    # The From and To headers' (display name, mailbox): `with_ascii_domains` writes them anew.
    addresses: tuple[tuple[str, str, str], ...] = ()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def with_ascii_domains(self) -> ComposedEmail:
        """This email for an SMTP server without SMTPUTF8: the From and To mailboxes and the envelope
        sender with a domain beyond ASCII as IDNA A-labels (`email_addresses.ascii_mailbox`); display
        names stay RFC 2047 encoded words. NoAsciiForm (naming whose and why) when a mailbox has no such
        form."""
        whose = {"From": SENDER, "To": RECIPIENT}
        rewritten = {
            header: (name, ascii_mailbox(box, whose[header])) for header, name, box in self.addresses
        }
        return replace(
            self,
            headers=tuple((k, _address(*rewritten[k]) if k in rewritten else v) for k, v in self.headers),
            envelope_from=ascii_mailbox(self.envelope_from, SENDER),
            addresses=tuple((header, *rewritten[header]) for header, _, _ in self.addresses),
        )

    def to_wire(self) -> bytes:
        boundary = f"=_clm_{uuid.uuid4().hex}"
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        head += f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
        parts = [head.encode()]
        for subtype, body in (("plain", self.text), ("html", self.html)):
            parts.append(
                f"--{boundary}\r\nContent-Type: text/{subtype}; charset=utf-8\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode()
            )
            parts.append(_quoted_printable(body))
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return b"".join(parts)


def _quoted_printable(body: str) -> bytes:
    encoded = binascii.b2a_qp(body.replace("\r\n", "\n").encode(), quotetabs=False, istext=True)
    return encoded.replace(b"\n", b"\r\n")


# RFC 5322: a header line is 998 octets at most. Plain text is written on one line (no folding), so
# text longer than this, with room for the header's name, goes as encoded words, which fold.
_LONGEST_PLAIN_HEADER = 900
# A display name longer than this goes as encoded words: a quoted string is not folded here, and its
# header line also holds the address (up to 320 octets).
_LONGEST_PLAIN_NAME = 75


def _control(value: str) -> bool:
    """A control character other than tab (NUL, VT, DEL, ...): not allowed raw in a header (RFC 5322
    text), even in a quoted string; some mail systems cut the header at a NUL."""
    return any((c < " " and c != "\t") or c == "\x7f" for c in value)


def _header(value: str) -> str:
    """ASCII as is (no CR/LF: no header injection); anything else, a control character or text too
    long for one line, as RFC 2047 encoded words."""
    value = value.replace("\r", " ").replace("\n", " ")
    if value.isascii() and not _control(value) and len(value) <= _LONGEST_PLAIN_HEADER:
        return value
    return _encoded_words(value)


def _encoded_words(value: str) -> str:
    words, chunk = [], ""
    for char in value:
        if len((chunk + char).encode()) > 45:
            words.append(chunk)
            chunk = ""
        chunk += char
    words.append(chunk)
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(w.encode()).decode()}?=" for w in words if w)


# RFC 5322 atext and the spaces between words: what a display name may hold unquoted.
_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ \t-]+")


def _display_name(name: str) -> str:
    """A display name as a header phrase. Beyond ASCII, RFC 2047 encoded words (`_header`); in ASCII
    with a special (`Doe, John`, `Dr. Who`, `Ann "Boss" Lee`, `a@b`), a quoted string, as
    `email.utils.formataddr` writes it (which refuses a mailbox beyond ASCII: an SMTPUTF8 address
    keeps its name too). Unquoted, a mail client read `Doe, John <john@example.com>` as two
    addresses, `Doe` and `John <john@...>`. A name that looks like an encoded word (`=?...?=`) says
    it literally: encoded itself, since clients (Python's among them) decode such words even inside
    quotes. So does one with a control character (`_control`), or one longer than
    `_LONGEST_PLAIN_NAME` (a quoted string of 1,200 characters made a header line past RFC 5322's
    998 octets, which a strict server refuses at the end of DATA); encoded words fold."""
    name = name.replace("\r", " ").replace("\n", " ")
    if not name.isascii() or "=?" in name or _control(name) or len(name) > _LONGEST_PLAIN_NAME:
        return _encoded_words(name)
    if _PHRASE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parsed(value: str) -> tuple[str, str]:
    """(display name, mailbox) of an address as written."""
    name, addr = parseaddr(value)
    return name, addr.strip()  # a no-break space around it is no part of it (as on the SMTP envelope)


def _address(name: str, addr: str) -> str:
    return f"{_display_name(name)} <{addr}>" if name else addr


def _ascii_domain(domain: str) -> str:
    """The domain as IDNA A-labels where it has them (the Message-ID is read by servers without
    SMTPUTF8 too), else as is."""
    try:
        return ascii_mailbox(f"x@{domain}").rpartition("@")[2]
    except NoAsciiForm:
        return domain


def build_email(
    *,
    message_id: str,
    sender: str,
    to: str,
    subject: str,
    text: str,
    body_html: str,
    unsubscribe_url: str | None,
    sent_at_epoch: float,
) -> ComposedEmail:
    sender_address = parseaddr(sender)[1]
    domain = _ascii_domain(sender_address.rsplit("@", 1)[-1] or "clm.local")
    addresses = (("From", *_parsed(sender)), ("To", *_parsed(to)))
    headers = [
        *((header, _address(name, box)) for header, name, box in addresses),
        ("Subject", _header(subject)),
        ("Date", formatdate(sent_at_epoch, usegmt=True)),
        # Deterministic: a receiving system can recognize a duplicate of the same message.
        ("Message-ID", f"<{re.sub(r'[^A-Za-z0-9._-]', '-', message_id)}@{domain}>"),
        ("X-CLM-Message-Id", _header(message_id)),
    ]
    if unsubscribe_url is not None:
        # RFC 8058 one-click: mailbox providers POST "List-Unsubscribe=One-Click" to this URL.
        headers.append(("List-Unsubscribe", f"<{unsubscribe_url}>"))
        headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    return ComposedEmail(tuple(headers), text, body_html, sender_address, addresses)
