"""A customer's profile as segment rules see it, and how events fold into it (pure, no I/O)."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import orjson

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
    # `traits` as compact JSON, in bytes (`traits_size`): measured the first time an event changes a
    # trait of this snapshot, then kept current by `apply_bounded_traits` (None: not measured yet).
    traits_bytes: int | None = None
    # Set once a change wrote a trait (its value or only its set time): the profile's traits and their
    # times are then saved with it; untouched, they stay as stored (most events write none).
    traits_written: bool = False
    # When the profile last changed (`customers.updated_at`), as read; an event batch sets it to the
    # time it dates its change by (what it then stores and announces).
    updated_at: datetime | None = None


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


# --------------------------------------------------------------------------- the bound on traits
#
# Every `ProfileChanged` and `SegmentMembershipChanged` carries the profile's full traits, and the
# journey engine copies them into message requests: a profile whose traits grew past Kafka's 1 MB
# message limit could never be announced again. Nothing else bounds them (each identify is under
# ingest's 32 KB, but may add new keys every time), so a change that would take the traits past
# `TraitLimits` is not applied. The rule, per trait change (one identify, one group call, the device
# traits of one event's context):
#
# - All or nothing: the change is applied whole, or none of it is (values and set times), so a
#   profile never holds half of an identify, and what is kept never depends on the order of the keys
#   in the payload (which SDKs do not promise).
# - It is refused only if it makes the traits bigger (bytes) or more (top-level names) *and* the
#   result is past the bound: an update that keeps or shrinks the traits always applies, also on a
#   profile already past the bound (one from before the bound existed, or after the bound was
#   lowered), so such a profile can always be brought back under it.
# - Only the traits: the event still counts (last_seen, counts, timeline, lifecycle).
#
# The size is the traits' compact JSON in bytes (UTF-8), the way they are stored and sent. It is
# measured once per profile per unit of work, only when an event changes a trait, and then kept by
# difference: each change costs the encoding of the values it sets and of those it replaces.


@dataclass(frozen=True)
class TraitLimits:
    """The bound on one profile's traits (settings `profile_max_trait_bytes`, `profile_max_traits`)."""

    max_bytes: int = 256 * 1024
    max_count: int = 1000


@dataclass(frozen=True)
class TraitRefusal:
    """A trait change not applied (or, in a merge, the merged-away traits left out)."""

    reason: Literal["size", "count"]
    names: tuple[str, ...]  # the traits whose new value was not applied, sorted
    bytes_before: int
    bytes_after: int  # had it been applied
    count_before: int
    count_after: int  # had it been applied


@dataclass
class TraitOutcome:
    changed: set[str]  # names whose value changed
    refused: TraitRefusal | None = None


def _encoded_len(value: Any, _dumps: Any = orjson.dumps, _option: int = orjson.OPT_NON_STR_KEYS) -> int:
    return len(_dumps(value, option=_option))


def traits_size(traits: Mapping[str, Any]) -> int:
    """The traits as compact JSON, in bytes."""
    return _encoded_len(traits)


def _entry_size(name: str, value: Any) -> int:
    """What one trait adds to `traits_size`: `"name":value` and its comma (or the closing brace)."""
    return _encoded_len(name) + _encoded_len(value) + 2


def _plan(
    traits: Mapping[str, Any], trait_times: Mapping[str, datetime], change: TraitChange
) -> tuple[dict[str, Any], list[str]]:
    """The new values `change` sets (differing from the current ones), and every name it writes (its
    set time moves, also when the value stays the same); names a later write set are left alone."""
    updates: dict[str, Any] = {}
    written: list[str] = []
    for name, value in change.traits.items():
        last = trait_times.get(name)
        if last is not None and last > change.at:
            continue  # a later write already set it
        if name == "account" and isinstance(value, dict) and isinstance(traits.get(name), dict):
            current = traits[name]
            if current.get("id") == value.get("id"):
                value = {**current, **value}
        written.append(name)
        if traits.get(name, _MISSING) != value or name not in traits:
            updates[name] = value
    return updates, written


def apply_traits(traits: dict[str, Any], trait_times: dict[str, datetime], change: TraitChange) -> set[str]:
    """Fold `change` into traits in place, unbounded; returns the names whose value changed. The
    events handler uses `apply_bounded_traits`."""
    updates, written = _plan(traits, trait_times, change)
    traits.update(updates)
    for name in written:
        trait_times[name] = change.at
    return set(updates)


def apply_bounded_traits(p: ProfileSnapshot, change: TraitChange, limits: TraitLimits) -> TraitOutcome:
    """Fold `change` into the profile's traits unless it would take them past `limits` (the rule
    above: all or nothing, refused only if it grows them past the bound)."""
    traits, times = p.traits, p.trait_times
    updates, written = _plan(traits, times, change)
    if updates:
        count = len(traits)
        added = sum(1 for name in updates if name not in traits)
        size = p.traits_bytes if p.traits_bytes is not None else traits_size(traits)
        delta = 0
        for name, value in updates.items():
            old = traits.get(name, _MISSING)
            if old is _MISSING and name not in traits:
                delta += _entry_size(name, value)
            else:  # the same name: only the values differ
                delta += _encoded_len(value) - _encoded_len(old)
        if not traits:
            delta -= 1  # `{}` is two bytes, `{"a":1}` one more than its entry
        reason: Literal["size", "count"] | None = None
        if added and count + added > limits.max_count:
            reason = "count"
        elif delta > 0 and size + delta > limits.max_bytes:
            reason = "size"
        if reason is not None:
            refusal = TraitRefusal(reason, tuple(sorted(updates)), size, size + delta, count, count + added)
            return TraitOutcome(set(), refusal)
        traits.update(updates)
        p.traits_bytes = size + delta
    for name in written:
        times[name] = change.at
    if written:
        p.traits_written = True
    return TraitOutcome(set(updates))


def merge_traits(
    into: tuple[dict[str, Any], dict[str, datetime]], other: tuple[dict[str, Any], dict[str, datetime]]
) -> tuple[dict[str, Any], dict[str, datetime], set[str]]:
    """Traits of two profiles that are one customer: per trait, the more recently set value wins
    (unbounded; the events handler's merges use `merge_bounded_traits`)."""
    merged = merge_bounded_traits(into, other, None)
    return merged.traits, merged.times, merged.changed


@dataclass
class TraitMerge:
    traits: dict[str, Any]
    times: dict[str, datetime]
    changed: set[str]
    dropped: TraitRefusal | None = None  # the merged-away profile's winning values left out


def merge_bounded_traits(
    into: tuple[dict[str, Any], dict[str, datetime]],
    other: tuple[dict[str, Any], dict[str, datetime]],
    limits: TraitLimits | None,
) -> TraitMerge:
    """Traits of two profiles that are one customer: per trait, the more recently set value wins.

    Within `limits`: two profiles each under the bound can make one past it (and merges repeat), so
    the survivor keeps its own traits and takes the merged-away profile's winning values, first
    those that do not make the traits bigger, then the others newest first (by set time, then
    name), each only if the traits stay within the bound; the rest are left out (`dropped`). A merge
    is not an upstream's one change, so it is not all or nothing: that would lose all of the other
    profile's traits (the anonymous visitor's email) for the sake of one big one."""
    traits, times = dict(into[0]), dict(into[1])
    winners: list[tuple[str, Any, datetime | None]] = []
    for name, value in other[0].items():
        at = other[1].get(name)
        mine = times.get(name)
        if name not in traits or (at is not None and (mine is None or at > mine)):
            winners.append((name, value, at))
    changed: set[str] = set()
    size = initial = traits_size(traits) if limits is not None else 0
    left_out: list[str] = []
    reasons: set[str] = set()
    bytes_wanted, count_wanted = size, len(traits)

    def take(name: str, value: Any, at: datetime | None) -> None:
        if traits.get(name, _MISSING) != value or name not in traits:
            changed.add(name)
        traits[name] = value
        if at is not None:
            times[name] = at

    if limits is None:
        for name, value, at in winners:
            take(name, value, at)
        return TraitMerge(traits, times, changed)
    growing: list[tuple[int, str, Any, datetime | None]] = []
    for name, value, at in winners:
        delta = _entry_size(name, value) - (_entry_size(name, traits[name]) if name in traits else 0)
        if name in traits and delta <= 0:
            size += delta
            bytes_wanted += delta
            take(name, value, at)
        else:
            growing.append((delta, name, value, at))
    # Newest first; values set at no known time (none from events) last.
    growing.sort(key=lambda g: (g[3] is None, -(g[3].timestamp() if g[3] else 0.0), g[1]))
    for delta, name, value, at in growing:
        new = name not in traits
        delta -= 1 if not traits else 0
        bytes_wanted += delta
        count_wanted += new
        if new and len(traits) + 1 > limits.max_count:
            reasons.add("count")
            left_out.append(name)
        elif size + delta > limits.max_bytes:
            reasons.add("size")
            left_out.append(name)
        else:
            size += delta
            take(name, value, at)
    dropped = None
    if left_out:
        reason: Literal["size", "count"] = "size" if "size" in reasons else "count"
        dropped = TraitRefusal(
            reason, tuple(sorted(left_out)), initial, bytes_wanted, len(into[0]), count_wanted
        )
    return TraitMerge(traits, times, changed, dropped)


_MISSING = object()
