"""Builds the MIME email: text and HTML alternatives, tracked links, open pixel, RFC 8058 headers."""

from __future__ import annotations

import html
import re
from email.message import EmailMessage
from email.utils import formatdate

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
) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = formatdate(sent_at_epoch, usegmt=True)
    # Deterministic: a receiving system can recognize a duplicate of the same message.
    domain = sender.rsplit("@", 1)[-1].strip("> ") or "clm.local"
    mail["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9._-]', '-', message_id)}@{domain}>"
    mail["X-CLM-Message-Id"] = message_id
    if unsubscribe_url is not None:
        # RFC 8058 one-click: mailbox providers POST "List-Unsubscribe=One-Click" to this URL.
        mail["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    mail.set_content(text)
    mail.add_alternative(body_html, subtype="html")
    return mail
