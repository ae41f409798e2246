"""The Python evaluator: every operator, nesting, time windows, property filters, next change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.segmenter.domain.catalog import compile_segment
from services.segmenter.domain.evaluation import bucket_of, evaluate, explain, next_change_at
from services.segmenter.domain.profile import EventAggregate, Occurrence, ProfileSnapshot
from services.segmenter.domain.rules import parse_rule

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def profile(**traits: Any) -> ProfileSnapshot:
    orders = [
        Occurrence(NOW - 40 * DAY, {"total": 20, "category": "shoes"}),
        Occurrence(NOW - 10 * DAY, {"total": 80, "category": "shoes"}),
        Occurrence(NOW - 2 * DAY, {"total": 15, "category": "books", "tags": ["gift"]}),
    ]
    return ProfileSnapshot(
        customer_id="c1",
        traits=traits,
        fields={
            "orders_count": 3,
            "revenue": 115.0,
            "first_order_at": NOW - 40 * DAY,
            "last_order_at": NOW - 2 * DAY,
            "first_seen": NOW - 50 * DAY,
            "last_seen": NOW - DAY,
            "event_count": 9,
        },
        events={
            "Order Completed": EventAggregate(3, NOW - 40 * DAY, NOW - 2 * DAY),
            "Signed In": EventAggregate(5, NOW - 50 * DAY, NOW - DAY),
        },
        timeline={"Order Completed": orders},
        memberships={"seg_vip"},
    )


def holds(definition: Any, p: ProfileSnapshot | None = None) -> bool:
    return evaluate(parse_rule(definition), p or profile(**TRAITS), NOW)


TRAITS = {
    "plan": "pro",
    "age": 34,
    "score": 7.5,
    "email": "ann@example.com",
    "tags": ["beta", "vip"],
    "verified": True,
    "signed_up_at": (NOW - 3 * DAY).isoformat(),
    "renewal": "2026-04-01",
    "nothing": None,
    "account": {"id": "acme", "tier": "gold"},
}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"trait": "plan", "op": "equals", "value": "pro"}, True),
        ({"trait": "plan", "op": "equals", "value": "free"}, False),
        ({"trait": "verified", "op": "equals", "value": 1}, False),  # true is not 1
        ({"trait": "age", "op": "equals", "value": 34.0}, True),
        ({"trait": "missing", "op": "equals", "value": "x"}, False),
        ({"trait": "plan", "op": "not_equals", "value": "free"}, True),
        ({"trait": "plan", "op": "not_equals", "value": "pro"}, False),
        ({"trait": "missing", "op": "not_equals", "value": "x"}, True),
        ({"trait": "plan", "op": "in", "values": ["free", "pro"]}, True),
        ({"trait": "plan", "op": "in", "values": ["free"]}, False),
        ({"trait": "email", "op": "contains", "value": "@example."}, True),
        ({"trait": "email", "op": "contains", "value": "@other."}, False),
        ({"trait": "tags", "op": "contains", "value": "vip"}, True),
        ({"trait": "tags", "op": "contains", "value": "vi"}, False),
        ({"trait": "age", "op": "contains", "value": "3"}, False),
        ({"trait": "plan", "op": "exists"}, True),
        ({"trait": "nothing", "op": "exists"}, False),
        ({"trait": "missing", "op": "not_exists"}, True),
        ({"trait": "plan", "op": "not_exists"}, False),
        ({"trait": "age", "op": "gt", "value": 33}, True),
        ({"trait": "age", "op": "gt", "value": 34}, False),
        ({"trait": "age", "op": "gte", "value": 34}, True),
        ({"trait": "score", "op": "lt", "value": 7.6}, True),
        ({"trait": "score", "op": "lte", "value": 7.4}, False),
        ({"trait": "plan", "op": "gt", "value": 1}, False),  # not a number
        ({"trait": "signed_up_at", "op": "within", "duration": "7d"}, True),
        ({"trait": "signed_up_at", "op": "within", "duration": "2d"}, False),
        ({"trait": "signed_up_at", "op": "before", "ago": "2d"}, True),
        ({"trait": "signed_up_at", "op": "after", "ago": "2d"}, False),
        ({"trait": "renewal", "op": "after", "value": "2026-03-31T23:59:59Z"}, True),
        ({"trait": "renewal", "op": "before", "value": "2026-03-31"}, False),
        ({"trait": "plan", "op": "before", "value": "2026-03-31"}, False),  # not a date
        ({"trait": "account.tier", "op": "equals", "value": "gold"}, True),
        ({"profile": "orders_count", "op": "gte", "value": 3}, True),
        ({"profile": "revenue", "op": "gt", "value": 200}, False),
        ({"profile": "last_order_at", "op": "within", "duration": "3d"}, True),
        ({"profile": "first_order_at", "op": "before", "ago": "30d"}, True),
        ({"member_of": "seg_vip"}, True),
        ({"member_of": "seg_other"}, False),
    ],
)
def test_trait_profile_and_membership_operators(condition: dict[str, Any], expected: bool) -> None:
    assert holds(condition) is expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"performed": "Order Completed"}, True),
        ({"performed": "Order Completed", "count": {"op": "at_least", "value": 4}}, False),
        ({"performed": "Order Completed", "count": {"op": "exactly", "value": 3}}, True),
        ({"performed": "Order Completed", "count": {"op": "at_most", "value": 2}}, False),
        ({"performed": "Never Done", "count": {"op": "at_most", "value": 0}}, True),
        ({"performed": "Order Completed", "within": "30d", "count": {"op": "exactly", "value": 2}}, True),
        ({"performed": "Order Completed", "within": "7d", "count": {"op": "exactly", "value": 1}}, True),
        ({"performed": "Order Completed", "within": "1d"}, False),
        (
            {
                "performed": "Order Completed",
                "between": {"from": "2026-01-01T00:00:00Z", "to": "2026-01-31T00:00:00Z"},
            },
            True,
        ),
        (
            {
                "performed": "Order Completed",
                "between": {"from": "2026-02-25T00:00:00Z"},
                "count": {"value": 2},
            },
            False,
        ),
        (
            {
                "performed": "Order Completed",
                "where": [{"property": "category", "op": "equals", "value": "shoes"}],
                "count": {"op": "exactly", "value": 2},
            },
            True,
        ),
        (
            {
                "performed": "Order Completed",
                "within": "30d",
                "where": [
                    {"property": "category", "op": "equals", "value": "shoes"},
                    {"property": "total", "op": "gte", "value": 50},
                ],
            },
            True,
        ),
        ({"performed": "Order Completed", "where": [{"property": "total", "op": "gt", "value": 100}]}, False),
        (
            {
                "performed": "Order Completed",
                "where": [{"property": "tags", "op": "contains", "value": "gift"}],
            },
            True,
        ),
        ({"not_performed": "Order Completed", "since": "1d"}, True),
        ({"not_performed": "Order Completed", "since": "3d"}, False),
        ({"not_performed": "Never Done", "since": "3d"}, True),
        ({"last_performed": "Order Completed", "op": "before", "ago": "1d"}, True),
        ({"last_performed": "Order Completed", "op": "after", "ago": "1d"}, False),
        ({"last_performed": "Order Completed", "op": "after", "value": "2026-02-01T00:00:00Z"}, True),
        ({"last_performed": "Never Done", "op": "before", "ago": "1d"}, False),
    ],
)
def test_behaviour_operators(condition: dict[str, Any], expected: bool) -> None:
    assert holds(condition) is expected


def test_nesting_and_or_not() -> None:
    rule = {
        "and": [
            {
                "or": [
                    {"trait": "plan", "op": "equals", "value": "free"},
                    {"trait": "age", "op": "gte", "value": 30},
                ]
            },
            {"not": {"performed": "Order Completed", "within": "1d"}},
            {
                "not": {
                    "and": [{"member_of": "seg_vip"}, {"trait": "verified", "op": "equals", "value": False}]
                }
            },
        ]
    }
    assert holds(rule)
    assert not holds({"not": rule})
    assert not holds({"and": [rule, {"or": [{"trait": "missing", "op": "exists"}]}]})


def test_random_bucket_is_stable_and_roughly_proportional() -> None:
    ids = [f"cust-{i}" for i in range(4000)]
    first = [bucket_of(c, "holdout", 100) for c in ids]
    assert first == [bucket_of(c, "holdout", 100) for c in ids]
    share = sum(b < 10 for b in first) / len(ids)
    assert 0.07 < share < 0.13
    rule = parse_rule({"random_bucket": {"buckets": 100, "below": 10, "salt": "holdout"}})
    assert [evaluate(rule, ProfileSnapshot(c), NOW) for c in ids] == [b < 10 for b in first]


def test_next_change_moments() -> None:
    p = profile(**TRAITS)
    # Order Completed 30-day window: the order of 10 days ago leaves it in 20 days.
    window = parse_rule({"performed": "Order Completed", "within": "30d", "count": {"value": 2}})
    assert next_change_at(window, p, NOW) == NOW + 20 * DAY
    # "no order in 7 days": the last order (2 days ago) makes it true in 5 days.
    lapsed = parse_rule({"not_performed": "Order Completed", "since": "7d"})
    assert next_change_at(lapsed, p, NOW) == NOW + 5 * DAY
    assert not evaluate(lapsed, p, NOW) and evaluate(lapsed, p, NOW + 5 * DAY)
    signed = parse_rule({"trait": "signed_up_at", "op": "within", "duration": "7d"})
    assert next_change_at(signed, p, NOW) == NOW + 4 * DAY
    combined = parse_rule(
        {"or": [window, {"not": lapsed}, {"trait": "plan", "op": "equals", "value": "pro"}]}
    )
    assert next_change_at(combined, p, NOW) == NOW + 5 * DAY
    assert next_change_at(parse_rule({"trait": "plan", "op": "equals", "value": "pro"}), p, NOW) is None


def test_dates_at_the_ends_of_time_schedule_nothing_and_never_overflow() -> None:
    within = {"op": "within", "duration": "30d"}
    for value in ["9999-12-31", "9999-12-31T23:59:59.999999", "9999-12-31T23:00:00-14:00", "0001-01-01"]:
        p = profile(renews_at=value)
        assert next_change_at(parse_rule({"trait": "renews_at", **within}), p, NOW) is None, value
        assert next_change_at(parse_rule({"trait": "renews_at", "op": "before", "ago": "1d"}), p, NOW) is None
        assert not evaluate(parse_rule({"trait": "renews_at", **within}), p, NOW)
    # Inside the horizon, the window's edges are due moments; past it, only what comes before it.
    soon = datetime(2999, 12, 1, tzinfo=UTC)
    assert (
        next_change_at(parse_rule({"trait": "renews_at", **within}), profile(renews_at=soon.isoformat()), NOW)
        == soon
    )
    late = parse_rule({"trait": "renews_at", "op": "before", "ago": "40d"})
    assert next_change_at(late, profile(renews_at=soon.isoformat()), NOW) is None  # 3000-01-10


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        # Orders at 2026-01-21T12:00Z, 2026-02-20T12:00Z and 2026-02-28T12:00Z.
        ({"performed": "Order Completed", "between": {"from": "2026-02-20", "to": "2026-02-28"}}, True),
        (
            {
                "performed": "Order Completed",
                "between": {"from": "2026-02-20T12:00:01", "to": "2026-02-28T11:59:59"},
            },
            False,
        ),
        (
            {
                "performed": "Order Completed",
                "between": {"from": "2026-02-20T12:00:00", "to": "2026-02-28T12:00:00Z"},
                "count": {"op": "exactly", "value": 2},
            },
            True,  # inclusive at both ends, in UTC
        ),
        ({"performed": "Order Completed", "between": {"from": "2026-02-28T12:00:01"}}, False),
        ({"last_performed": "Order Completed", "op": "before", "value": "2026-02-28T12:00:00"}, True),
        ({"last_performed": "Order Completed", "op": "after", "value": "2026-02-28"}, True),
        ({"trait": "renewal", "op": "after", "value": "2026-03-31T23:59:59"}, True),
        ({"trait": "renewal", "op": "before", "value": "2026-04-01T00:00:00"}, True),
        (
            {
                "performed": "Order Completed",
                "where": [{"property": "at", "op": "after", "value": "2026-02-20T11:00:00"}],
            },
            True,
        ),
        (
            {
                "performed": "Order Completed",
                "where": [{"property": "at", "op": "before", "value": "2026-01-21T11:59:59"}],
            },
            False,
        ),
    ],
)
def test_times_without_a_zone_are_utc_in_the_interpreter_and_the_compiled_rule(
    condition: dict[str, Any], expected: bool
) -> None:
    """Windows, `last_performed` values, trait and property dates written without a zone are UTC:
    both evaluators agree, and none compares a naive time with an aware one (TypeError)."""
    p = profile(**TRAITS)
    p.timeline["Order Completed"] = [
        Occurrence(o.timestamp, {**o.properties, "at": o.timestamp.replace(tzinfo=None).isoformat()})
        for o in p.timeline["Order Completed"]
    ]
    seg = compile_segment("s", "s", 1, condition)
    for now in (NOW, NOW + 40 * DAY):
        assert evaluate(seg.rule, p, now) is expected, condition
        assert seg.holds(p, now) is expected, condition
        assert seg.next_change_at(p, now) == next_change_at(seg.rule, p, now)


def test_order_compares_doubles_and_equality_json_values_in_the_interpreter_and_the_compiled_rule() -> None:
    """gt/gte/lt/lte as doubles (as SQL's float8 cast: past 2**53 integers round), equals/in/contains
    as the decimal a number's JSON text writes (as jsonb): whichever form a number comes in (the
    event's float, or the int jsonb gives back for it), every evaluator says the same."""
    cases: list[tuple[Any, dict[str, Any], bool]] = [
        (9007199254740993, {"op": "gt", "value": 9007199254740992}, False),
        (9007199254740993, {"op": "gte", "value": 9007199254740992.0}, True),
        (9223372036854775807, {"op": "lt", "value": 9223372036854775808}, False),
        (9223372036854775807, {"op": "lte", "value": 9.223372036854776e18}, True),
        (2**64 - 1, {"op": "gt", "value": 2**63}, True),
        (10**400, {"op": "gt", "value": 1e299}, True),  # past any double: no OverflowError
        (-(10**400), {"op": "lt", "value": -1e299}, True),
        (0.1, {"op": "lte", "value": 0.1}, True),
        (9007199254740993, {"op": "equals", "value": 9007199254740992}, False),
        (9007199254740993, {"op": "equals", "value": 9007199254740993}, True),
        (1, {"op": "equals", "value": 1.0}, True),
        (1.0, {"op": "in", "values": [1]}, True),
        (1.152921504606847e18, {"op": "equals", "value": 1152921504606847000}, True),
        (1152921504606847000, {"op": "equals", "value": 1.152921504606847e18}, True),
        (1152921504606846976, {"op": "equals", "value": 1.152921504606847e18}, False),
        (1.152921504606847e18, {"op": "not_equals", "value": 1152921504606846976}, True),
        (9007199254740992.0, {"op": "equals", "value": 9007199254740992}, True),
        ([1152921504606847000], {"op": "contains", "value": 1.152921504606847e18}, True),
        (True, {"op": "equals", "value": 1}, False),
    ]
    for value, comparison, expected in cases:
        seg = compile_segment("s", "s", 1, {"trait": "n", **comparison})
        p = ProfileSnapshot("c1", traits={"n": value})
        assert evaluate(seg.rule, p, NOW) is expected, (value, comparison)
        assert seg.holds(p, NOW) is expected, (value, comparison)


def test_explain_names_each_node() -> None:
    rule = parse_rule(
        {
            "and": [
                {"trait": "plan", "op": "equals", "value": "pro"},
                {"performed": "Order Completed", "within": "1d"},
            ]
        }
    )
    out = explain(rule, profile(**TRAITS), NOW).as_json()
    assert out["holds"] is False
    assert [(c["path"], c["holds"]) for c in out["children"]] == [
        ("definition.and[0]", True),
        ("definition.and[1]", False),
    ]
    assert out["children"][1]["detail"]["count"] == 0
