"""Device traits from Segment's `context`: taken when the profile lacks them, valid values only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.segmenter.domain.profile import apply_traits, context_traits, merge_traits, trait_change
from shared.contracts import storable
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
    assert change is not None and change.at == storable.EARLIEST_TIME  # any identify wins over them
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


def test_an_identify_wins_even_when_older_and_in_a_merge() -> None:
    """An identify's timezone with an earlier timestamp than the page view that set the device's
    still replaces it; and merging a device profile into a customer keeps the customer's identify."""
    traits: dict[str, Any] = {}
    times: dict[str, datetime] = {}
    device = context_traits(event(DEVICE, timestamp=AT), traits)
    assert device is not None
    apply_traits(traits, times, device)
    older = trait_change(
        event(
            {},
            "identify",
            user_id="u1",
            traits={"timezone": "America/New_York"},
            timestamp=AT - timedelta(days=1),
        )
    )
    assert older is not None and apply_traits(traits, times, older) == {"timezone"}
    customer: dict[str, Any] = {"timezone": "America/New_York"}
    customer_times = {"timezone": AT - timedelta(days=365)}
    device_traits: dict[str, Any] = {}
    device_times: dict[str, datetime] = {}
    apply_traits(device_traits, device_times, context_traits(event({"timezone": "Europe/Paris"}), {}))  # type: ignore[arg-type]
    merged, _, _ = merge_traits((customer, customer_times), (device_traits, device_times))
    assert merged["timezone"] == "America/New_York"
