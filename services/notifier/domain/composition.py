"""Turns a request, the customer's contact and a rendered template into what a provider sends."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.notifier.domain.email_addresses import mailbox
from services.notifier.domain.email_content import add_open_pixel, build_email, track_links
from services.notifier.domain.phone_numbers import normalized
from services.notifier.domain.signing import MessageLinks
from services.notifier.domain.templates import RenderedMessage
from shared.contracts import Channel, MessageCategory, MessageRequested, MessageStatus, MessageStatusKind
from shared.contracts.events import message_data_problems


@dataclass(frozen=True)
class ContactView:
    """What the notifier knows about a customer (from the profile projection), pure data."""

    customer_id: str
    email: str | None = None
    # `email`'s mailbox in lower case (`domain.email_addresses`): a spam complaint finds the customer by it.
    email_address: str | None = None
    phone: str | None = None
    # `phone` in E.164 as read when the profile arrived (an inbound STOP finds the customer by it);
    # sends read `phone` again, in the region set then.
    phone_e164: str | None = None
    push_token: str | None = None
    webhook_url: str | None = None
    locale: str | None = None
    timezone: str | None = None
    traits: dict[str, Any] | None = None


def _text(value: Any) -> str | None:
    """A trait usable as an address, locale or zone: a non-blank string. `false` is not an email
    address and `72057594037927936` not a locale (traits are whatever clients sent)."""
    return value if isinstance(value, str) and value.strip() else None


def _phone(value: Any) -> str | None:
    """A phone trait: a string, or a number some clients send instead (never a boolean)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    return _text(value)


def contact_from_traits(
    customer_id: str, traits: dict[str, Any], sms_default_region: str | None = None
) -> ContactView:
    phone = _phone(traits.get("phone"))
    email = _text(traits.get("email"))
    return ContactView(
        customer_id=customer_id,
        email=email,
        email_address=mailbox(email) if email else None,
        phone=phone,
        phone_e164=normalized(phone, sms_default_region) if phone else None,
        push_token=_text(traits.get("push_token") or traits.get("pushToken")),
        webhook_url=_text(traits.get("webhook_url") or traits.get("webhookUrl")),
        locale=_text(traits.get("locale")),
        timezone=_text(traits.get("timezone")),
        traits=traits,
    )


def recipient_address(request: MessageRequested, contact: ContactView | None) -> str | None:
    """The request's own recipient fields win; the projection fills what is missing."""
    r = request.recipient
    c = contact or ContactView(request.customer_id)
    if request.channel is Channel.EMAIL:
        return r.email or c.email
    if request.channel is Channel.SMS:
        return r.phone or c.phone
    if request.channel is Channel.PUSH:
        return r.push_token or c.push_token
    if request.channel is Channel.WEBHOOK:
        return r.webhook_url or c.webhook_url
    return request.customer_id


def unsubscribe_url(request: MessageRequested, links: MessageLinks) -> str | None:
    if request.category is not MessageCategory.MARKETING:
        return None
    return links.unsubscribe_url(
        request.customer_id, request.channel.value, request.subscription_topic, request.message_id
    )


class InvalidTemplateData(ValueError):
    """A request's data the template variables cannot be made from: the message fails with this
    reason (the API refuses such data with a 400 instead)."""


def describe(problems: list[tuple[str, str]]) -> str:
    return "; ".join(f"{field} {problem}" for field, problem in problems)


def template_data(
    request: MessageRequested, contact: ContactView | None, links: MessageLinks, address: str | None
) -> dict[str, Any]:
    """The variables a template sees. Raises `InvalidTemplateData` for data that cannot be merged
    (a request from another service is not validated as the API's are)."""
    problems = message_data_problems(request.data)
    if problems:
        raise InvalidTemplateData(describe(problems))
    data = dict(request.data)
    traits = {**((contact.traits if contact else None) or {}), **(data.get("traits") or {})}
    journey = {
        "id": request.journey_id,
        "version": request.journey_version,
        "instance_id": request.instance_id,
        "node_id": request.node_id,
        **(data.get("journey") or {}),
    }
    unsubscribe = unsubscribe_url(request, links)
    data.update(
        {
            "traits": traits,
            "event": data.get("event") or {},
            # Issue 9: the journey engine passes the segmenter's lists; empty when a request has none,
            # so `{% for p in recommendations.cross_sell %}` renders nothing instead of failing.
            "recommendations": data.get("recommendations") or {"cross_sell": [], "upsell": []},
            "journey": journey,
            "customer": {
                "id": request.customer_id,
                "email": request.recipient.email or (contact.email if contact else None),
                "phone": request.recipient.phone or (contact.phone if contact else None),
                "locale": locale_of(request, contact),
                "timezone": request.recipient.timezone or (contact.timezone if contact else None),
                "address": address,
            },
            "message": {
                "id": request.message_id,
                "channel": request.channel.value,
                "category": request.category.value,
            },
            "unsubscribe_url": unsubscribe or "",
            "preferences_url": links.unsubscribe_url(
                request.customer_id, request.channel.value, request.subscription_topic, request.message_id
            ),
        }
    )
    return data


def locale_of(request: MessageRequested, contact: ContactView | None) -> str | None:
    traits = (request.data.get("traits") or {}) if isinstance(request.data.get("traits"), dict) else {}
    return (
        _text(traits.get("locale"))
        or request.recipient.locale
        or (contact.locale if contact else None)
        or (_text((contact.traits or {}).get("locale")) if contact else None)
    )


def email_parts(
    request: MessageRequested, rendered: RenderedMessage, links: MessageLinks, *, track: bool
) -> tuple[str, str]:
    """(html, text) with tracked links and the open pixel when tracking is on."""
    body_html = rendered.part("html")
    if track:
        body_html = add_open_pixel(
            track_links(body_html, request.message_id, links), links.open_pixel_url(request.message_id)
        )
    return body_html, rendered.part("text")


def compose_email(
    request: MessageRequested,
    rendered: RenderedMessage,
    links: MessageLinks,
    *,
    sender: str,
    to: str,
    now: datetime,
    track: bool = True,
) -> Any:
    body_html, text = email_parts(request, rendered, links, track=track)
    return build_email(
        message_id=request.message_id,
        sender=sender,
        to=to,
        subject=rendered.part("subject").strip(),
        text=text,
        body_html=body_html,
        unsubscribe_url=unsubscribe_url(request, links),
        sent_at_epoch=now.timestamp(),
    )


def status_of(
    request: MessageRequested,
    kind: MessageStatusKind,
    at: datetime,
    *,
    reason: str | None = None,
    provider: str | None = None,
    url: str | None = None,
    status_id: str | None = None,
) -> MessageStatus:
    return MessageStatus(
        # Deterministic: a re-emitted status is recognized by consumers' inboxes.
        status_id=status_id or f"{request.message_id}:{kind.value}",
        message_id=request.message_id,
        customer_id=request.customer_id,
        status=kind,
        channel=request.channel,
        occurred_at=at,
        reason=reason,
        provider=provider,
        url=url,
        template_id=request.template_id,
        category=request.category,
        journey_id=request.journey_id,
        journey_version=request.journey_version,
        instance_id=request.instance_id,
        node_id=request.node_id,
    )
