"""The bound on a profile's traits (pure): a change that would take them past it is refused whole,
one that keeps or shrinks them always applies, and merges take the other profile's values newest
first while they fit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from services.segmenter.domain.profile import (
    ProfileSnapshot,
    TraitChange,
    TraitLimits,
    apply_bounded_traits,
    merge_bounded_traits,
    merge_traits,
    traits_size,
)
from shared.contracts import storable

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def size(traits: dict[str, Any]) -> int:
    return len(orjson.dumps(traits))


def profile(traits: dict[str, Any] | None = None) -> ProfileSnapshot:
    traits = dict(traits or {})
    return ProfileSnapshot("c1", traits=traits, trait_times=dict.fromkeys(traits, T0))


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_the_kept_size_is_the_serialized_size_through_adds_replacements_and_the_first_trait() -> None:
    p = profile()
    limits = TraitLimits(max_bytes=10_000, max_count=100)
    changes: list[dict[str, Any]] = [
        {"email": "ann@example.com"},
        {"plan": "pro", "näme": "Ånn", "nested": {"a": [1, 2.5, None, True]}},
        {"plan": "enterprise", "email": None},
        {"nested": "flat"},
        {"plan": "pro"},
    ]
    for i, traits in enumerate(changes):
        outcome = apply_bounded_traits(p, TraitChange(traits, at(i)), limits)
        assert outcome.refused is None
        assert p.traits_bytes == size(p.traits) == traits_size(p.traits)


def test_a_change_that_would_pass_the_byte_bound_is_refused_whole_and_the_profile_is_unchanged() -> None:
    p = profile({"email": "ann@example.com"})
    before, times = dict(p.traits), dict(p.trait_times)
    limits = TraitLimits(max_bytes=size(p.traits) + 100, max_count=100)
    # `plan` alone would fit; with the big one the change does not: none of it applies.
    outcome = apply_bounded_traits(p, TraitChange({"plan": "pro", "junk": "x" * 200}, at(1)), limits)
    assert outcome.changed == set()
    assert outcome.refused is not None
    assert outcome.refused.reason == "size"
    assert outcome.refused.names == ("junk", "plan")
    assert outcome.refused.bytes_before == size(before)
    assert outcome.refused.bytes_after > limits.max_bytes
    assert p.traits == before and p.trait_times == times  # not even the set times move
    assert not p.traits_written  # nothing for the batch's write to save
    # The same change without the big value applies.
    assert apply_bounded_traits(p, TraitChange({"plan": "pro"}, at(2)), limits).changed == {"plan"}
    assert p.trait_times["plan"] == at(2)
    assert p.traits_written


def test_a_change_that_only_moves_set_times_marks_the_traits_written() -> None:
    """The batch's profile write saves traits only when one was written: the same value again still
    moves its set time, which must be saved too."""
    p = profile({"plan": "pro"})
    limits = TraitLimits(max_bytes=10_000, max_count=100)
    outcome = apply_bounded_traits(p, TraitChange({"plan": "pro"}, at(5)), limits)
    assert outcome.changed == set()
    assert p.trait_times["plan"] == at(5)
    assert p.traits_written
    stale = profile({"plan": "pro"})
    stale.trait_times["plan"] = at(10)  # a later write already set it: nothing is written
    apply_bounded_traits(stale, TraitChange({"plan": "free"}, at(5)), limits)
    assert stale.traits == {"plan": "pro"} and not stale.traits_written


def test_the_bound_is_inclusive() -> None:
    p = profile()
    target = {"k": "x" * 50}
    limits = TraitLimits(max_bytes=size(target), max_count=10)
    assert apply_bounded_traits(p, TraitChange(target, T0), limits).refused is None
    assert size(p.traits) == limits.max_bytes
    assert apply_bounded_traits(p, TraitChange({"k": "x" * 51}, at(1)), limits).refused is not None


def test_repeated_identifies_adding_keys_stop_at_the_bound() -> None:
    limits = TraitLimits(max_bytes=4096, max_count=10_000)
    p = profile()
    refused = 0
    for i in range(500):
        outcome = apply_bounded_traits(p, TraitChange({f"key_{i}": "v" * 20}, at(i)), limits)
        refused += outcome.refused is not None
        assert size(p.traits) <= limits.max_bytes
    assert refused > 0 and len(p.traits) < 500
    assert set(p.trait_times) == set(p.traits)  # refused names leave no set time behind


def test_updates_that_keep_or_shrink_the_traits_apply_at_the_bound_and_past_it() -> None:
    # Past the bound already (a profile from before it, or the bound lowered since).
    p = profile({"bio": "x" * 500, "plan": "free", "email": "a@example.com"})
    limits = TraitLimits(max_bytes=100, max_count=2)
    assert size(p.traits) > limits.max_bytes and len(p.traits) > limits.max_count
    # Same size: applies.
    assert apply_bounded_traits(p, TraitChange({"plan": "pro!"}, at(1)), limits).changed == {"plan"}
    # Smaller: applies (several at once too), and the kept size follows.
    outcome = apply_bounded_traits(p, TraitChange({"bio": "short", "email": None}, at(2)), limits)
    assert outcome.changed == {"bio", "email"} and outcome.refused is None
    assert p.traits_bytes == size(p.traits)
    # Bigger: refused while the result is past the bound.
    assert apply_bounded_traits(p, TraitChange({"bio": "x" * 200}, at(3)), limits).refused is not None
    # An unchanged value still moves its set time (nothing grows).
    assert apply_bounded_traits(p, TraitChange({"plan": "pro!"}, at(4)), limits).changed == set()
    assert p.trait_times["plan"] == at(4)


def test_a_change_that_shrinks_one_trait_and_grows_the_profile_overall_is_refused() -> None:
    p = profile({"bio": "x" * 60, "plan": "free"})
    limits = TraitLimits(max_bytes=size(p.traits), max_count=10)
    outcome = apply_bounded_traits(p, TraitChange({"bio": "short", "extra": "y" * 80}, at(1)), limits)
    assert outcome.refused is not None and p.traits["bio"] == "x" * 60
    # A net shrink with a new key is fine.
    outcome = apply_bounded_traits(p, TraitChange({"bio": "short", "extra": "y"}, at(2)), limits)
    assert outcome.refused is None and outcome.changed == {"bio", "extra"}


def test_the_count_bound_refuses_new_names_but_not_updates_of_existing_ones() -> None:
    p = profile({"a": 1, "b": 2})
    limits = TraitLimits(max_bytes=100_000, max_count=3)
    assert apply_bounded_traits(p, TraitChange({"c": 3}, at(1)), limits).changed == {"c"}
    outcome = apply_bounded_traits(p, TraitChange({"a": 10, "d": 4}, at(2)), limits)
    assert outcome.refused is not None and outcome.refused.reason == "count"
    assert (outcome.refused.count_before, outcome.refused.count_after) == (3, 4)
    assert p.traits == {"a": 1, "b": 2, "c": 3}
    assert apply_bounded_traits(p, TraitChange({"a": 10, "b": "bigger"}, at(3)), limits).changed == {"a", "b"}


def test_a_later_write_wins_and_superseded_names_do_not_count() -> None:
    p = profile()
    limits = TraitLimits(max_bytes=60, max_count=10)
    assert apply_bounded_traits(p, TraitChange({"bio": "x" * 30}, at(10)), limits).refused is None
    # Older than the stored value: nothing to apply, so nothing to refuse.
    outcome = apply_bounded_traits(p, TraitChange({"bio": "y" * 500}, at(5)), limits)
    assert outcome.refused is None and outcome.changed == set()
    assert p.traits["bio"] == "x" * 30


def test_group_calls_growing_the_account_trait_are_bounded() -> None:
    p = profile()
    limits = TraitLimits(max_bytes=1024, max_count=10)
    refused = 0
    for i in range(100):
        change = TraitChange({"account": {"id": "acme", f"field_{i}": "v" * 10}}, at(i))
        refused += apply_bounded_traits(p, change, limits).refused is not None
    assert refused > 0 and size(p.traits) <= limits.max_bytes
    assert p.traits_bytes == size(p.traits)


def test_the_profile_is_measured_only_when_a_trait_changes() -> None:
    p = profile({"plan": "pro"})
    limits = TraitLimits()
    apply_bounded_traits(p, TraitChange({"plan": "pro"}, at(1)), limits)
    assert p.traits_bytes is None  # same value: nothing measured
    apply_bounded_traits(p, TraitChange({"plan": "free"}, at(2)), limits)
    assert p.traits_bytes == size(p.traits)


def test_a_merge_within_the_bound_takes_every_winning_value() -> None:
    into = ({"plan": "pro", "city": "Oslo"}, {"plan": at(1), "city": at(1)})
    other = ({"plan": "free", "email": "a@example.com"}, {"plan": at(2), "email": at(0)})
    merged = merge_bounded_traits(into, other, TraitLimits())
    assert merged.dropped is None
    assert merged.traits == {"plan": "free", "city": "Oslo", "email": "a@example.com"}
    assert (merged.traits, merged.times, merged.changed) == merge_traits(into, other)


def test_a_merge_past_the_bound_keeps_the_survivor_and_takes_the_newest_that_fit() -> None:
    survivor = {"s1": "x" * 40, "s2": "x" * 40}
    into = (survivor, dict.fromkeys(survivor, at(0)))
    other_traits = {"old": "o" * 40, "new": "n" * 40, "mid": "m" * 40, "s1": "short", "tz": "UTC"}
    other_times = {"old": at(1), "new": at(3), "mid": at(2), "s1": at(5), "tz": storable.EARLIEST_TIME}
    # Room for the survivor (with s1 shrunk), two more of the other's 40-byte values (not three) and
    # the small `tz` (set at the earliest time: taken last).
    limits = TraitLimits(max_bytes=size({**survivor, "s1": "short", "new": "n" * 40, "mid": "m" * 40}) + 15)
    merged = merge_bounded_traits(into, (other_traits, other_times), limits)
    assert merged.traits == {"s1": "short", "s2": "x" * 40, "new": "n" * 40, "mid": "m" * 40, "tz": "UTC"}
    assert size(merged.traits) <= limits.max_bytes
    assert merged.dropped is not None and merged.dropped.names == ("old",)
    assert merged.dropped.reason == "size"
    assert set(merged.times) == set(merged.traits)
    assert merged.changed == {"s1", "new", "mid", "tz"}


def test_a_merge_respects_the_count_bound() -> None:
    into = ({"a": 1}, {"a": at(0)})
    other = ({"b": 2, "c": 3}, {"b": at(1), "c": at(2)})
    merged = merge_bounded_traits(into, other, TraitLimits(max_bytes=10_000, max_count=2))
    assert merged.traits == {"a": 1, "c": 3}
    assert merged.dropped is not None and merged.dropped.reason == "count"
    assert merged.dropped.names == ("b",)


def test_repeated_merges_of_full_profiles_stay_within_the_bound() -> None:
    limits = TraitLimits(max_bytes=2048, max_count=1000)
    traits: dict[str, Any] = {}
    times: dict[str, datetime] = {}
    for n in range(10):
        other = {f"p{n}_{i}": "v" * 30 for i in range(40)}
        merged = merge_bounded_traits((traits, times), (other, dict.fromkeys(other, at(n))), limits)
        traits, times = merged.traits, merged.times
        assert size(traits) <= limits.max_bytes


@pytest.mark.parametrize("max_bytes", [1, 2, 3])
def test_a_tiny_bound_refuses_every_trait_but_never_fails(max_bytes: int) -> None:
    p = profile()
    outcome = apply_bounded_traits(p, TraitChange({"a": 1}, T0), TraitLimits(max_bytes=max_bytes))
    assert outcome.refused is not None and p.traits == {}
