"""Device traits from Segment's `context`: taken when the profile lacks them, valid values only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.segmenter.domain.profile import apply_traits, context_traits, trait_change
from shared.contracts.events import CustomerEvent

AT = datetime(2026, 11, 1, 12, tzinfo=UTC)


def event(context: dict[str, Any], kind: str = "track", **fields: Any) -> CustomerEvent:
    values: dict[str, Any] = {
        "message_id": f"m-{len(str(context))}-{kind}",
        "type": kind,
        "anonymous_id": "a1",
        "timestamp": fields.pop("timestamp", AT),
        "received_at": AT,
        "context": context,
        **fields,
    }
    if kind == "track":
        values.setdefault("event", "Product Viewed")
    return CustomerEvent.model_validate(values)


DEVICE = {"timezone": "Europe/Oslo", "locale": "nb-NO", "device": {"token": "fcm-token-1", "type": "android"}}


def test_a_profile_without_them_takes_the_devices_timezone_locale_and_push_token() -> None:
    change = context_traits(event(DEVICE), {})
    assert change is not None and change.at == AT
    assert change.traits == {"timezone": "Europe/Oslo", "locale": "nb-NO", "push_token": "fcm-token-1"}


def test_traits_the_profile_has_are_never_replaced() -> None:
    traits = {"timezone": "America/New_York", "locale": "en-US", "pushToken": "apns-1"}
    assert context_traits(event(DEVICE), traits) is None
    assert context_traits(event(DEVICE), {"timezone": "UTC"}).traits == {  # type: ignore[union-attr]
        "locale": "nb-NO",
        "push_token": "fcm-token-1",
    }


def test_invalid_values_are_ignored() -> None:
    bad = {
        "timezone": "Mars/Olympus_Mons",
        "locale": "not a locale!",
        "device": {"token": "x" * 5000},
    }
    assert context_traits(event(bad), {}) is None
    assert context_traits(event({"timezone": "../../etc/passwd", "locale": 7, "device": "phone"}), {}) is None
    assert context_traits(event({}), {}) is None


def test_an_identify_later_replaces_the_devices_value_and_the_device_then_changes_nothing() -> None:
    traits: dict[str, Any] = {}
    times: dict[str, datetime] = {}
    first = context_traits(event(DEVICE), traits)
    assert first is not None
    assert apply_traits(traits, times, first) == {"timezone", "locale", "push_token"}
    identify = event(
        {}, "identify", user_id="u1", traits={"timezone": "Asia/Tokyo"}, timestamp=AT + timedelta(hours=1)
    )
    change = trait_change(identify)
    assert change is not None and apply_traits(traits, times, change) == {"timezone"}
    later = event({**DEVICE, "timezone": "Europe/Paris"}, timestamp=AT + timedelta(hours=2))
    assert context_traits(later, traits) is None
    assert traits["timezone"] == "Asia/Tokyo"
