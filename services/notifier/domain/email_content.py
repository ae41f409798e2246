"""Builds the MIME email: text and HTML alternatives, tracked links, open pixel, RFC 8058 headers."""

from __future__ import annotations

import html
import io
import re
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import compat32
from email.utils import formatdate, parseaddr

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


# Quoted-printable bodies: readable in the raw .eml, and no line-length trouble for long HTML lines.
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


# Long unsubscribe URLs must stay on one line (SMTP allows 998 characters); folding them breaks clients.
_NO_FOLDING = compat32.clone(max_line_length=998)


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    part.set_payload(body, _UTF8_QP)
    return part


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
) -> Message:
    # The legacy (compat32) MIME classes: several times cheaper to build than `EmailMessage` with the
    # default policy, which re-parses every header it is given.
    mail = MIMEMultipart("alternative", policy=_NO_FOLDING)
    mail["From"] = _header(sender)
    mail["To"] = to
    mail["Subject"] = _header(subject)
    mail["Date"] = formatdate(sent_at_epoch, usegmt=True)
    # Deterministic: a receiving system can recognize a duplicate of the same message.
    domain = sender.rsplit("@", 1)[-1].strip("> ") or "clm.local"
    mail["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9._-]', '-', message_id)}@{domain}>"
    mail["X-CLM-Message-Id"] = message_id
    if unsubscribe_url is not None:
        # RFC 8058 one-click: mailbox providers POST "List-Unsubscribe=One-Click" to this URL.
        mail["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    mail.attach(_text_part(text, "plain"))
    mail.attach(_text_part(body_html, "html"))
    return mail


_WIRE = _NO_FOLDING.clone(linesep="\r\n")


def to_wire(mail: Message) -> bytes:
    """The bytes sent over SMTP (CRLF, no folding of long headers)."""
    out = io.BytesIO()
    BytesGenerator(out, policy=_WIRE).flatten(mail)
    return out.getvalue()


def envelope_sender(mail: Message) -> str:
    return parseaddr(str(mail["From"]))[1]
