"""Identity resolution planning (pure): links, merges and their causes, the shared-device rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.segmenter.domain.identity import batch_identifiers, plan_identities, split_identities
from services.segmenter.domain.profile import TraitChange, apply_traits, merge_traits, trait_change
from shared.contracts.events import CustomerEvent

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def ev(mid: str, type: str = "track", **fields: Any) -> CustomerEvent:
    return CustomerEvent.model_validate(
        {"message_id": mid, "type": type, "timestamp": T0, "received_at": T0, "event": "X", **fields}
    )


def test_new_identifiers_make_one_customer_and_link_to_it() -> None:
    events = [ev("1", anonymous_id="a1"), ev("2", "identify", anonymous_id="a1", user_id="u1")]
    plan = plan_identities(events, {}, set(), set())
    assert plan.new_customers == ["a1"]
    assert sorted(plan.links) == [("anon", "a1", "a1"), ("user", "u1", "a1")]
    assert plan.customer_of_event == ["a1", "a1"] and plan.merges == []


def test_anonymous_profile_merges_into_the_known_user() -> None:
    known = {("user", "u1"): "u1", ("anon", "a2"): "a2"}
    plan = plan_identities([ev("m3", "identify", user_id="u1", anonymous_id="a2")], known, {"u1"}, set())
    assert [(m.from_id, m.into_id, m.message_id) for m in plan.merges] == [("a2", "u1", "m3")]
    assert plan.merges[0].identifiers == [("user", "u1"), ("anon", "a2")]
    assert plan.customer_of_event == ["u1"]


def test_a_shared_device_does_not_merge_two_known_users_but_an_alias_does() -> None:
    known = {("user", "u1"): "u1", ("user", "u2"): "u2", ("anon", "a1"): "u1"}
    plan = plan_identities(
        [ev("m1", "identify", user_id="u2", anonymous_id="a1")], known, {"u1", "u2"}, set()
    )
    assert plan.merges == [] and plan.customer_of_event == ["u2"]
    alias = ev("m2", "alias", user_id="u2", previous_id="u1")
    assert batch_identifiers([alias]) == {("user", "u2"), ("user", "u1"), ("anon", "u1")}
    plan = plan_identities([alias], known, {"u1", "u2"}, set())
    assert [(m.from_id, m.into_id, m.event_type) for m in plan.merges] == [("u1", "u2", "alias")]


def test_later_events_of_the_batch_follow_merges_and_ids_never_collide() -> None:
    events = [
        ev("1", anonymous_id="x"),
        ev("2", user_id="x"),  # a userId equal to someone's anonymousId: a different customer
        ev("3", "identify", user_id="x", anonymous_id="x"),
        ev("4", anonymous_id="x"),
    ]
    plan = plan_identities(events, {}, set(), set())
    assert plan.new_customers == ["x", "user:x"]
    assert [(m.from_id, m.into_id) for m in plan.merges] == [("x", "user:x")]
    assert plan.customer_of_event == ["user:x"] * 4


def test_traits_last_write_by_event_time_wins_and_group_traits_go_under_account() -> None:
    traits: dict[str, Any] = {}
    times: dict[str, datetime] = {}
    assert apply_traits(traits, times, TraitChange({"plan": "pro", "city": "Oslo"}, T0)) == {"plan", "city"}
    assert apply_traits(traits, times, TraitChange({"plan": "free"}, T0 - timedelta(hours=1))) == set()
    assert apply_traits(traits, times, TraitChange({"plan": "pro"}, T0 + timedelta(hours=1))) == set()
    assert traits == {"plan": "pro", "city": "Oslo"} and times["plan"] == T0 + timedelta(hours=1)
    group = trait_change(ev("g", "group", user_id="u1", group_id="acme", traits={"tier": "gold"}))
    assert group is not None and group.traits == {"account": {"id": "acme", "tier": "gold"}}
    apply_traits(traits, times, group)
    more = trait_change(ev("g2", "group", user_id="u1", group_id="acme", traits={"seats": 5}))
    assert more is not None
    apply_traits(traits, times, TraitChange(more.traits, T0 + timedelta(hours=2)))
    assert traits["account"] == {"id": "acme", "tier": "gold", "seats": 5}
    merged, merged_times, changed = merge_traits(
        ({"plan": "pro"}, {"plan": T0}),
        ({"plan": "team", "age": 3}, {"plan": T0 + timedelta(days=1), "age": T0}),
    )
    assert merged == {"plan": "team", "age": 3} and changed == {"plan", "age"}
    assert merged_times["plan"] == T0 + timedelta(days=1)


def test_an_event_naming_its_customer_goes_to_that_profile_and_links_nothing() -> None:
    """A journey's trait update names the canonical id, here a visitor's anonymousId: as a userId it
    would have made a new, empty customer `user:a1`."""
    known = {("user", "u1"): "a1", ("anon", "a1"): "a1", ("merged", "old"): "a1"}
    named = ev("j1", "identify", user_id="a1", customer_id="a1", traits={"vip": True})
    assert ("merged", "a1") in batch_identifiers([named])
    plan = plan_identities([named], known, {"a1"}, {"a1"})
    assert plan.customer_of_event == ["a1"]
    assert plan.new_customers == [] and plan.links == [] and plan.merges == []
    # A merged-away id lands on the survivor; one nobody knows resolves by its identifiers as before.
    merged = ev("j2", "identify", user_id="old", customer_id="old")
    assert plan_identities([merged], known, {"a1"}, set()).customer_of_event == ["a1"]
    unknown = plan_identities([ev("j3", "identify", user_id="zz", customer_id="zz")], known, set(), set())
    assert unknown.new_customers == ["zz"] and unknown.links == [("user", "zz", "zz")]


def test_a_new_customer_id_is_never_one_already_taken() -> None:
    # Customer `7` (anonymousId 7) and `user:7` (userId "user:7") exist: userId 7 is a third person.
    plan = plan_identities([ev("1", user_id="7")], {}, set(), {"7", "user:7"})
    assert plan.new_customers == ["user:7:2"] and plan.customer_of_event == ["user:7:2"]
    plan = plan_identities(
        [ev("1", user_id="7"), ev("2", anonymous_id="user:7")],
        {},
        set(),
        {"7", "user:7", "user:7:2", "user:7:4"},
    )
    assert plan.new_customers == ["user:7:3", "anon:user:7"]


def test_a_merged_away_id_is_never_a_new_customers_id() -> None:
    """`a1` was merged into `u1`: a new person whose userId is `a1` gets `user:a1`, so an event naming
    customer `a1` (a journey's trait update) still means the survivor."""
    plan = plan_identities([ev("1", user_id="a1")], {}, set(), set(), retired_ids={"a1"})
    assert plan.new_customers == ["user:a1"]
    known = {("merged", "a1"): "u1"}
    named = plan_identities(
        [ev("2", "identify", user_id="a1", customer_id="a1")], known, set(), set(), {"a1"}
    )
    assert named.customer_of_event == ["u1"] and named.new_customers == []


def test_identities_are_split_in_parts_of_at_most_n_values_in_order() -> None:
    ids = {"anonymous_id": ["a1", "a2", "a3", "a4"], "user_id": ["u1"], "merged_customer_id": ["m1", "m2"]}
    parts = split_identities(ids, 3)
    assert parts == [
        {"anonymous_id": ["a1", "a2", "a3"]},
        {"anonymous_id": ["a4"], "user_id": ["u1"], "merged_customer_id": ["m1"]},
        {"merged_customer_id": ["m2"]},
    ]
    assert split_identities(ids, 7) == [ids]
    assert split_identities({}, 3) == [{}]  # a profile without identities still gets its one message
