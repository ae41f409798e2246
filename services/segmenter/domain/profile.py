"""A customer's profile as segment rules see it, and how events fold into it (pure, no I/O)."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from shared.contracts import storable
from shared.contracts.events import CustomerEvent, EventType

ORDER_EVENT = "Order Completed"


@dataclass
class EventAggregate:
    count: int
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True)
class Occurrence:
    timestamp: datetime
    properties: dict[str, Any]


@dataclass
class ProfileSnapshot:
    customer_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    trait_times: dict[str, datetime] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    events: dict[str, EventAggregate] = field(default_factory=dict)
    # Only for event names some rule needs occurrence by occurrence (windows, property filters).
    timeline: dict[str, list[Occurrence]] = field(default_factory=dict)
    memberships: set[str] = field(default_factory=set)
    # Categories in the stored recommendation lists ("cross_sell"/"upsell" -> categories, "*" if any).
    recommendations: dict[str, set[str]] = field(default_factory=dict)


def aggregate_name(event: CustomerEvent) -> str | None:
    """The name an event is counted under (`track` by its event name; pages and screens by kind)."""
    if event.type == EventType.TRACK:
        return event.event
    if event.type == EventType.PAGE:
        return "Page Viewed"
    if event.type == EventType.SCREEN:
        return "Screen Viewed"
    return None


# An order amount past this is a placeholder or a mistake, not revenue: sums of such amounts overflow
# (PostgreSQL refuses a float8 past 1.8e308, and a sum that reaches it) and would poison the customer.
MAX_ORDER_AMOUNT = 1e12


def order_revenue(properties: dict[str, Any]) -> float:
    """`revenue`, else `total`: a number or a numeric string within +-`MAX_ORDER_AMOUNT`; else 0."""
    for key in ("revenue", "total"):
        v = properties.get(key)
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if numeric or (isinstance(v, str) and _NUMERIC.match(v)):
            amount = float(v)  # type: ignore[arg-type]
            if abs(amount) <= MAX_ORDER_AMOUNT:
                return amount
    return 0.0


# Numeric strings as `store.lifecycle` reads them in SQL (Python's float() takes more: "inf", "1_0",
# Unicode spaces, which PostgreSQL's numeric refuses).
_NUMERIC = re.compile(r"^[ \t]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9][0-9]?[0-9]?)?[ \t]*$")


@dataclass
class TraitChange:
    """Traits an event sets, and when (last write by event time wins)."""

    traits: dict[str, Any]
    at: datetime


def trait_change(event: CustomerEvent) -> TraitChange | None:
    if event.type == EventType.IDENTIFY and event.traits:
        return TraitChange(dict(event.traits), event.timestamp)
    if event.type == EventType.GROUP and event.group_id:
        # Group traits live under one `account` trait, so a person's traits are never overwritten by them.
        return TraitChange({"account": {"id": event.group_id, **event.traits}}, event.timestamp)
    return None


# Segment's `context` carries what the SDKs know of the device: the timezone and locale (analytics.js,
# the mobile SDKs) and a push token (`context.device.token`). A profile without these traits takes
# them from there, so quiet hours, local-time sends, template locales and push work for customers
# who never sent them as traits; a trait set by an identify is never replaced by them, nor loses to
# them in a merge (they count as set at the earliest storable time).
CONTEXT_TRAITS = ("timezone", "locale", "push_token")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,4}")
_MAX_TOKEN = 4096


@lru_cache(maxsize=1024)
def _known_zone(name: str) -> bool:
    if not 0 < len(name) <= 64:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def context_traits(event: CustomerEvent, traits: Mapping[str, Any]) -> TraitChange | None:
    """The device traits of the event's context that the profile does not have yet (valid ones only:
    an IANA timezone, a BCP 47-like locale, a push token)."""
    context = event.context
    if not context:
        return None
    found: dict[str, Any] = {}
    timezone = context.get("timezone")
    if "timezone" not in traits and isinstance(timezone, str) and _known_zone(timezone):
        found["timezone"] = timezone
    locale = context.get("locale")
    if "locale" not in traits and isinstance(locale, str) and _LOCALE.fullmatch(locale):
        found["locale"] = locale
    device = context.get("device")
    token = device.get("token") if isinstance(device, dict) else None
    if (
        "push_token" not in traits
        and "pushToken" not in traits
        and isinstance(token, str)
        and 0 < len(token) <= _MAX_TOKEN
    ):
        found["push_token"] = token
    # As old as a trait can be: any identify's value, earlier or later, and a merged profile's, win.
    return TraitChange(found, storable.EARLIEST_TIME) if found else None


def apply_traits(traits: dict[str, Any], trait_times: dict[str, datetime], change: TraitChange) -> set[str]:
    """Fold `change` into traits in place; returns the names whose value changed."""
    changed: set[str] = set()
    for name, value in change.traits.items():
        last = trait_times.get(name)
        if last is not None and last > change.at:
            continue  # a later write already set it
        if name == "account" and isinstance(value, dict) and isinstance(traits.get(name), dict):
            current = traits[name]
            if current.get("id") == value.get("id"):
                value = {**current, **value}
        if traits.get(name, _MISSING) != value or name not in traits:
            traits[name] = value
            changed.add(name)
        trait_times[name] = change.at
    return changed


def merge_traits(
    into: tuple[dict[str, Any], dict[str, datetime]], other: tuple[dict[str, Any], dict[str, datetime]]
) -> tuple[dict[str, Any], dict[str, datetime], set[str]]:
    """Traits of two profiles that are one customer: per trait, the more recently set value wins."""
    traits, times = dict(into[0]), dict(into[1])
    changed: set[str] = set()
    for name, value in other[0].items():
        at = other[1].get(name)
        mine = times.get(name)
        if name not in traits or (at is not None and (mine is None or at > mine)):
            if traits.get(name, _MISSING) != value:
                changed.add(name)
            traits[name] = value
            if at is not None:
                times[name] = at
    return traits, times, changed


_MISSING = object()
