"""Parsing and checking rule definitions: errors point at the offending node."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.segmenter.domain.catalog import (
    Catalog,
    CycleError,
    compile_segment,
    cycle_through,
    dependency_order,
)
from services.segmenter.domain.compiled import compile_predicate
from services.segmenter.domain.evaluation import evaluate
from services.segmenter.domain.rules import (
    InvalidRule,
    LastPerformedCondition,
    PerformedCondition,
    member_of_nodes,
    parse_duration,
    parse_rule,
    references,
    rule_to_json,
)
from tests.segmenter.domain.test_evaluation import NOW, profile


def errors(definition: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRule) as info:
        parse_rule(definition)
    return [(e.path, e.rule) for e in info.value.errors]


def test_errors_point_at_the_offending_node() -> None:
    assert errors({"and": [{"trait": "a", "op": "exists"}, {"trait": "b", "op": "gt", "value": "x"}]}) == [
        ("definition.and[1].value", "number")
    ]
    assert errors({"or": [{"bogus": 1}]})[0] == ("definition.or[0]", "unknown_rule")
    assert errors({"not": {"trait": "a", "op": "nope"}})[0][0] == "definition.not.op"
    assert errors({"performed": "X", "within": "soon"}) == [("definition.within", "duration")]
    assert errors({"trait": "a", "op": "in", "values": []}) == [("definition.values", "required")]
    assert errors({"trait": "a", "op": "before"}) == [("definition.value", "one_of")]
    assert errors({"trait": "a", "op": "equals", "value": "x", "ago": "1d"}) == [
        ("definition.ago", "unexpected")
    ]
    assert errors({"profile": "shoe_size", "op": "gt", "value": 1}) == [
        ("definition.profile", "unknown_field")
    ]
    assert errors({"and": []})[0] == ("definition.and", "too_short")
    assert errors({"random_bucket": {"buckets": 10, "below": 11}}) == [
        ("definition.random_bucket.below", "range")
    ]
    assert errors({"performed": "X", "where": [{"property": "p", "op": "within", "duration": "1d"}]}) == [
        ("definition.where[0].op", "relative")
    ]
    assert errors("everyone")[0][1] == "unknown_rule"


def test_valid_definitions_round_trip() -> None:
    definition = {
        "and": [
            {"trait": "plan", "op": "in", "values": ["pro", "team"]},
            {
                "performed": "Order Completed",
                "where": [{"property": "total", "op": "gte", "value": 50}],
                "count": {"op": "at_least", "value": 2},
                "within": "30d",
            },
            {"not": {"member_of": "seg_a"}},
        ]
    }
    rule = parse_rule(definition)
    assert parse_rule(rule_to_json(rule)) == rule
    refs = references(rule)
    assert refs.traits == {"plan"} and refs.events == {"Order Completed"} and refs.segments == {"seg_a"}
    assert refs.timeline_events == {"Order Completed"} and refs.time_dependent


def test_out_of_range_durations_and_numbers_are_refused_not_left_to_fail_each_evaluation() -> None:
    """`now - 1000000d` is no date: accepted, such a rule failed every re-evaluation (the events
    consumer dead-lettered batch after batch) and every back-fill; numbers beyond float8 failed in SQL."""
    assert errors({"performed": "X", "within": "1000000d"}) == [("definition.within", "duration")]
    assert errors({"not_performed": "X", "since": "P99999999999D"}) == [("definition.since", "duration")]
    assert errors({"trait": "t", "op": "within", "duration": 10**30}) == [("definition.duration", "duration")]
    assert errors({"trait": "t", "op": "before", "ago": "3000000d"}) == [("definition.ago", "duration")]
    assert errors({"trait": "n", "op": "gt", "value": 1e400}) == [("definition.value", "number")]
    assert errors({"trait": "n", "op": "equals", "value": 10**400}) == [("definition.value", "scalar")]
    assert errors({"trait": "n", "op": "gt", "value": 10**23}) == [("definition.value", "number")]
    assert errors({"trait": "n", "op": "in", "values": [2**64]}) == [("definition.values[0]", "scalar")]
    parse_rule({"trait": "n", "op": "gt", "value": 2**63})  # within 64 bits: fine
    assert errors({"trait": "n", "op": "in", "values": ["a", float("nan")]}) == [
        ("definition.values[1]", "scalar")
    ]
    assert errors({"performed": "X", "count": {"op": "at_least", "value": 10**30}})[0][0] == (
        "definition.count.value"
    )
    assert parse_duration("36500d").days == 36_500  # a hundred years is still fine


def test_durations() -> None:
    assert parse_duration("30d").days == 30
    assert parse_duration("2w").days == 14
    assert parse_duration(90).total_seconds() == 90
    with pytest.raises(ValueError):
        parse_duration("3 months")


def test_catalog_index_and_dependency_order() -> None:
    a = compile_segment("a", "A", 1, {"trait": "plan", "op": "equals", "value": "pro"})
    b = compile_segment("b", "B", 1, {"and": [{"member_of": "a"}, {"performed": "Order Completed"}]})
    c = compile_segment("c", "C", 1, {"profile": "last_seen", "op": "within", "duration": "1d"})
    cat = Catalog.build([b, c, a])
    assert [s.segment_id for s in cat.segments].index("a") < [s.segment_id for s in cat.segments].index("b")
    assert cat.affected({"plan"}, []) == {"a", "b"}
    assert cat.affected(set(), ["Order Completed"]) == {"b", "c"}
    assert cat.affected(set(), ["Page Viewed"]) == {"c"}
    assert cat.affected({"name"}, []) == set()
    x = compile_segment("x", "X", 1, {"member_of": "y"})
    y = compile_segment("y", "Y", 1, {"member_of": "x"})
    with pytest.raises(CycleError):
        dependency_order([x, y])


def test_iso_8601_durations_as_journeys_write_them() -> None:
    assert parse_duration("P30D") == parse_duration("30d")
    assert parse_duration("PT12H") == parse_duration("12h")
    assert parse_duration("P2W") == parse_duration("2w")
    assert parse_duration("P1DT6H").total_seconds() == 30 * 3600
    for bad in ("P", "PT", "P1M", "P1Y", "P1DT"):  # months and years have no fixed length
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    iso = parse_rule({"performed": "Order Completed", "within": "P7D"})
    assert rule_to_json(iso) == {"performed": "Order Completed", "within": "P7D"}


def test_absolute_times_without_a_zone_are_utc() -> None:
    """`2026-03-01` or `2026-03-01T10:00:00` in `between` or `last_performed` is UTC, as a date in a
    trait is. Kept naive, they raised TypeError next to aware event times (every batch evaluating the
    segment failed) and a window mixing both forms was a 500."""
    rule = parse_rule({"performed": "X", "between": {"from": "2026-03-01", "to": "2026-03-31T10:00:00"}})
    assert isinstance(rule, PerformedCondition) and rule.between is not None
    assert rule.between.start == datetime(2026, 3, 1, tzinfo=UTC) and rule.between.start.tzinfo is not None
    assert rule.between.end == datetime(2026, 3, 31, 10, tzinfo=UTC) and rule.between.end.tzinfo is not None
    assert rule_to_json(rule)["between"] == {"from": "2026-03-01T00:00:00Z", "to": "2026-03-31T10:00:00Z"}
    # A zone given is kept; both forms mixed compare as UTC.
    mixed = parse_rule(
        {"performed": "X", "between": {"from": "2026-01-01T00:00:00", "to": "2026-02-01T00:00:00+02:00"}}
    )
    assert isinstance(mixed, PerformedCondition) and mixed.between is not None
    assert mixed.between.end == datetime(2026, 1, 31, 22, tzinfo=UTC)
    assert mixed.between.end.utcoffset() == timedelta(hours=2)  # type: ignore[union-attr]
    assert errors(
        {"performed": "X", "between": {"from": "2026-02-01T00:00:00", "to": "2026-01-31T23:00:00+02:00"}}
    ) == [("definition.between.to", "order")]
    last = parse_rule({"last_performed": "X", "op": "after", "value": "2026-02-01"})
    assert isinstance(last, LastPerformedCondition) and last.value == datetime(2026, 2, 1, tzinfo=UTC)
    assert last.value.tzinfo is not None


def test_a_definition_stored_with_times_without_a_zone_loads_them_as_utc() -> None:
    """Before they were read as UTC, such times were stored as written (`2026-03-01T00:00:00`): the
    catalogue re-parses stored definitions with the same models, so they load as UTC too."""
    stored = {
        "and": [
            {
                "performed": "Order Completed",
                "between": {"from": "2026-03-01T00:00:00", "to": "2026-03-31T00:00:00"},
            },
            {"last_performed": "Signed In", "op": "before", "value": "2026-03-15T08:30:00"},
        ]
    }
    seg = compile_segment("seg_old", "old", 3, stored)
    window, last = rule_to_json(seg.rule)["and"]
    assert window["between"] == {"from": "2026-03-01T00:00:00Z", "to": "2026-03-31T00:00:00Z"}
    assert last["value"] == "2026-03-15T08:30:00Z"
    catalog = Catalog.build(
        [seg, compile_segment("seg_w", "w", 1, {"performed": "Order Completed", "within": "30d"})]
    )
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert catalog.timeline_since(now) == {"Order Completed": datetime(2026, 1, 31, 12, tzinfo=UTC)}


LATE, EARLY = "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"  # year 10000, year 0 in UTC


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        ({"trait": "d", "op": "before", "value": LATE}, "definition.value"),
        ({"trait": "d", "op": "after", "value": EARLY}, "definition.value"),
        ({"profile": "last_seen", "op": "after", "value": "0001-01-01T00:00:00.5+00:01"}, "definition.value"),
        ({"performed": "X", "between": {"from": EARLY}}, "definition.between.from"),
        ({"performed": "X", "between": {"to": LATE}}, "definition.between.to"),
        ({"last_performed": "X", "op": "after", "value": EARLY}, "definition.value"),
        ({"last_performed": "X", "op": "before", "value": "9999-12-31T12:00:00-12:00"}, "definition.value"),
        (
            {
                "and": [
                    {"trait": "d", "op": "exists"},
                    {"performed": "X", "where": [{"property": "at", "op": "before", "value": LATE}]},
                ]
            },
            "definition.and[1].where[0].value",
        ),
    ],
)
def test_absolute_dates_no_datetime_can_hold_in_utc_are_refused(definition: Any, field: str) -> None:
    """Accepted because the text parsed, such a date (year 10000 or year 0 in UTC) failed in SQL:
    preview answered 500, and every back-fill chunk of the segment failed."""
    assert errors(definition) == [(field, "range")]


def test_each_end_of_a_window_out_of_range_is_named() -> None:
    with pytest.raises(InvalidRule) as info:
        parse_rule({"performed": "X", "between": {"from": EARLY, "to": LATE}})
    assert [(e.path, e.rule, e.message) for e in info.value.errors] == [
        ("definition.between.from", "range", "must be from 0001-01-01 to 9999-12-31 in UTC"),
        ("definition.between.to", "range", "must be from 0001-01-01 to 9999-12-31 in UTC"),
    ]


@pytest.mark.parametrize(
    "definition",
    [
        # "Never expires", "founded long ago": dates that worked before 2026-12-07, and still do.
        {"trait": "valid_until", "op": "before", "value": "9999-12-31"},
        {"trait": "valid_until", "op": "after", "value": "2999-12-31"},
        {"trait": "founded", "op": "before", "value": "1850-01-01"},
        {"performed": "X", "between": {"from": "1800-01-01T00:00:00Z"}},
        {"performed": "X", "between": {"from": "0001-01-01", "to": "9999-12-31T23:59:59.999999Z"}},
        {"trait": "d", "op": "after", "value": "0001-01-01T00:00:00Z"},
        {"trait": "d", "op": "before", "value": "9999-12-31T23:00:00-00:59"},
        {"last_performed": "X", "op": "before", "value": "0001-01-01T01:00:00+01:00"},
        {"performed": "X", "where": [{"property": "at", "op": "after", "value": "1066-10-14"}]},
    ],
)
def test_any_date_a_datetime_holds_in_utc_is_accepted(definition: Any) -> None:
    rule = parse_rule(definition)
    # Accepted means usable: the reference and the compiled evaluator decide it, and agree, for a
    # profile holding such dates (the SQL form is compared in tests/segmenter/test_sql_rules_agree.py).
    p = profile(valid_until="9999-12-31T00:00:00Z", founded="1700-01-01", d="5000-01-01T00:00:00Z")
    assert evaluate(rule, p, NOW) == compile_predicate(rule)(p, NOW)


def test_member_of_nodes_are_named_by_the_paths_check_rule_gives() -> None:
    rule = parse_rule(
        {
            "and": [
                {"trait": "plan", "op": "exists"},
                {"member_of": "seg_a"},
                {"or": [{"not": {"member_of": "seg_b"}}, {"member_of": "seg_a"}]},
            ]
        }
    )
    assert member_of_nodes(rule) == [
        ("definition.and[1].member_of", "seg_a"),
        ("definition.and[2].or[0].not.member_of", "seg_b"),
        ("definition.and[2].or[1].member_of", "seg_a"),
    ]
    assert member_of_nodes(parse_rule({"member_of": "seg_a"})) == [("definition.member_of", "seg_a")]
    assert member_of_nodes(parse_rule({"trait": "plan", "op": "exists"})) == []
    # The same path format as a node's own error.
    assert errors({"and": [{"member_of": "seg_a"}, {"not": {"trait": "a", "op": "gt", "value": "x"}}]}) == [
        ("definition.and[1].not.value", "number")
    ]


def test_a_reference_closing_a_cycle_is_found_with_the_cycle() -> None:
    refers = {"b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"b"}}
    assert cycle_through("a", "b", refers) == ["a", "b", "c", "a"]
    assert cycle_through("a", "e", refers) == ["a", "e", "b", "c", "a"]
    assert cycle_through("a", "a", refers) == ["a", "a"]  # itself
    assert cycle_through("a", "d", refers) is None
    assert cycle_through("a", "unknown", refers) is None
    assert cycle_through("x", "b", {"b": {"b"}}) is None  # a cycle elsewhere is not this one's
