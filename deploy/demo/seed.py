"""What `make demo` creates through the public APIs: a write key, subscription topics, templates,
segments and journeys that map the customer lifecycle."""

from __future__ import annotations

import itertools
from typing import Any

TOPICS: dict[str, dict[str, Any]] = {
    "onboarding": {"name": "Onboarding tips", "channels": ["email"], "default_subscribed": True},
    "cart": {"name": "Cart reminders", "channels": ["email"], "default_subscribed": True},
    "promotions": {"name": "Offers and recommendations", "channels": ["email"], "default_subscribed": True},
    "surveys": {"name": "Surveys", "channels": ["email"], "default_subscribed": True},
}

_FOOTER_HTML = '<p style="font-size:12px"><a href="{% unsubscribe_link %}">Unsubscribe</a></p>'
_FOOTER_TEXT = "\n\nUnsubscribe: {% unsubscribe_link %}"


def _email(template_id: str, name: str, subject: str, body: str) -> dict[str, Any]:
    return {
        "id": template_id,
        "name": name,
        "channel": "email",
        "variants": {
            "en": {
                "subject": subject,
                "html": f"<p>{body}</p>{_FOOTER_HTML}",
                "text": body + _FOOTER_TEXT,
            }
        },
    }


NAME = "{{ traits.first_name | default: 'there' }}"

TEMPLATES: list[dict[str, Any]] = [
    _email(
        "demo-welcome",
        "Welcome",
        f"Welcome to CLM Shop, {NAME}!",
        f"Hi {NAME}, thanks for signing up. Here is what to do first.",
    ),
    _email(
        "demo-tips",
        "Onboarding tips",
        "Three tips to get started",
        f"Hi {NAME}, three things our best customers do in their first week.",
    ),
    _email(
        "demo-cart",
        "Abandoned cart",
        "You left something in your cart",
        f"Hi {NAME}, your cart is waiting for you.",
    ),
    _email(
        "demo-cross-sell",
        "Cross-sell after first order",
        "Goes well with your order",
        f"Hi {NAME}, customers who bought what you bought also liked these.",
    ),
    _email(
        "demo-winback",
        "Win-back",
        f"We miss you, {NAME}",
        f"Hi {NAME}, it has been a while. Here is 15% off your next order.",
    ),
    _email(
        "demo-nps",
        "NPS survey",
        "How likely are you to recommend us?",
        f"Hi {NAME}, on a scale of 0 to 10, how likely are you to recommend CLM Shop to a friend?",
    ),
    _email(
        "demo-referral",
        "Referral ask",
        "Share the love, get 10 EUR",
        f"Thanks for the great score, {NAME}! Invite a friend and you both get 10 EUR.",
    ),
    _email(
        "demo-recovery",
        "Service recovery",
        "We are sorry, let us fix it",
        f"Hi {NAME}, we read your answer. A person from our team will contact you today.",
    ),
]

# Lifecycle stage thresholds for the demo's compressed time (a month of history, waits of minutes):
# the defaults (onboarding for 30 days, at risk after 120 days without an order) would keep every
# simulated customer onboarding, and no one would become at risk, so the win-back journey never ran.
LIFECYCLE_THRESHOLDS: dict[str, Any] = {
    "onboarding_days": 7,
    "at_risk_inactive_days": 10,
    "churned_inactive_days": 25,
}

SEGMENTS: dict[str, dict[str, Any]] = {
    "new_signups": {
        "name": "Demo: signed up in the last 7 days",
        "definition": {"performed": "Signed Up", "within": "7d"},
    },
    "promoters": {
        "name": "Demo: NPS promoters",
        "definition": {
            "performed": "Survey Responded",
            "where": [{"property": "score", "op": "gte", "value": 9}],
            "within": "90d",
        },
    },
    "detractors": {
        "name": "Demo: NPS detractors",
        "definition": {
            "performed": "Survey Responded",
            "where": [{"property": "score", "op": "lte", "value": 6}],
            "within": "90d",
        },
    },
}


def _send(node_id: str, template: str, topic: str) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "send",
        "channel": "email",
        "template_id": template,
        "subscription_topic": topic,
    }


def _line(*node_ids: str) -> list[dict[str, str]]:
    return [{"from": a, "to": b} for a, b in itertools.pairwise(node_ids)]


def journeys(segment_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Journey id -> definition; segment entries refer to the ids the segmenter gave."""
    return {
        "demo-welcome-series": {
            "name": "Onboarding welcome series",
            "entry": {"type": "segment", "segment_id": segment_ids["new_signups"], "change": "entered"},
            "goal": {"event": "Order Completed", "within": "P14D"},
            "nodes": [
                {"id": "start", "type": "entry"},
                _send("welcome", "demo-welcome", "onboarding"),
                {"id": "wait", "type": "delay", "duration": "PT2M"},
                _send("tips", "demo-tips", "onboarding"),
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "welcome", "wait", "tips", "done"),
        },
        "demo-abandoned-cart": {
            "name": "Abandoned cart",
            "entry": {
                "type": "event",
                "event": "Product Added",
                "where": [{"field": "event.properties.cart_id", "op": "exists"}],
            },
            "correlation_key": "cart_id",
            "reentry": {"policy": "always"},
            "nodes": [
                {"id": "start", "type": "entry"},
                {
                    "id": "wait_order",
                    "type": "wait_event",
                    "event": "Order Completed",
                    "match_correlation": True,
                    "timeout": "PT1M",
                },
                _send("remind", "demo-cart", "cart"),
                {"id": "done", "type": "exit"},
            ],
            "edges": [
                {"from": "start", "to": "wait_order"},
                {"from": "wait_order", "to": "done", "branch": "matched"},
                {"from": "wait_order", "to": "remind", "branch": "timeout"},
                {"from": "remind", "to": "done"},
            ],
        },
        "demo-cross-sell": {
            "name": "Cross-sell after a first order",
            "entry": {"type": "event", "event": "Order Completed"},
            "reentry": {"policy": "once"},
            "nodes": [
                {"id": "start", "type": "entry"},
                {"id": "wait", "type": "delay", "duration": "PT3M"},
                _send("offer", "demo-cross-sell", "promotions"),
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "wait", "offer", "done"),
        },
        "demo-win-back": {
            "name": "Win-back when a customer becomes at risk",
            "entry": {"type": "lifecycle_stage", "to_stage": "at_risk"},
            "reentry": {"policy": "after", "days": 30},
            "nodes": [
                {"id": "start", "type": "entry"},
                _send("winback", "demo-winback", "promotions"),
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "winback", "done"),
        },
        "demo-nps": {
            "name": "NPS survey after an order",
            "entry": {"type": "event", "event": "Order Completed"},
            "reentry": {"policy": "after", "days": 90},
            "nodes": [
                {"id": "start", "type": "entry"},
                {"id": "wait", "type": "delay", "duration": "PT1M"},
                _send("survey", "demo-nps", "surveys"),
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "wait", "survey", "done"),
        },
        "demo-referral": {
            "name": "Promoters are asked for a referral",
            "entry": {"type": "segment", "segment_id": segment_ids["promoters"], "change": "entered"},
            "nodes": [
                {"id": "start", "type": "entry"},
                _send("ask", "demo-referral", "promotions"),
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "ask", "done"),
        },
        "demo-service-recovery": {
            "name": "Detractors get a service-recovery message",
            "category": "transactional",
            "entry": {"type": "segment", "segment_id": segment_ids["detractors"], "change": "entered"},
            "nodes": [
                {"id": "start", "type": "entry"},
                {"id": "sorry", "type": "send", "channel": "email", "template_id": "demo-recovery"},
                {"id": "done", "type": "exit"},
            ],
            "edges": _line("start", "sorry", "done"),
        },
    }
