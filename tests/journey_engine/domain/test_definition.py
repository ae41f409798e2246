"""Validation of the journey graph: each rule names the node and the rule."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any
from unittest.mock import ANY
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter, ValidationError

from services.journey_engine.domain.definition import (
    NOTIFIER_NAME,
    Edge,
    EventEntry,
    JourneyDefinition,
    Node,
    QuietWindow,
    definition_warnings,
    graph_errors,
    json_problem,
)
from services.journey_engine.domain.timing import QuietHours
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.api.consent import NAME as TOPIC_NAME
from services.notifier.api.templates import NAME as TEMPLATE_NAME


def journey(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], **extra: Any) -> JourneyDefinition:
    return JourneyDefinition.model_validate(
        {
            "name": "t",
            "entry": {"type": "event", "event": "Signed Up"},
            "nodes": nodes,
            "edges": edges,
            **extra,
        }
    )


def rules(definition: JourneyDefinition) -> set[tuple[str, str]]:
    return {(e.field, e.rule) for e in graph_errors(definition)}


GOOD_NODES = [
    {"id": "start", "type": "entry"},
    {"id": "wait", "type": "wait_event", "event": "Order Completed", "timeout": "PT1H"},
    {"id": "remind", "type": "send", "channel": "email", "template_id": "cart"},
    {"id": "done", "type": "exit"},
]
GOOD_EDGES = [
    {"from": "start", "to": "wait"},
    {"from": "wait", "to": "done", "branch": "matched"},
    {"from": "wait", "to": "remind", "branch": "timeout"},
    {"from": "remind", "to": "done"},
]


def test_a_valid_graph_has_no_errors() -> None:
    assert graph_errors(journey(GOOD_NODES, GOOD_EDGES)) == []


def test_exactly_one_entry() -> None:
    nodes = [*GOOD_NODES, {"id": "start2", "type": "entry"}]
    assert ("nodes", "one_entry") in rules(journey(nodes, [*GOOD_EDGES, {"from": "start2", "to": "done"}]))


def test_dangling_edge_names_the_edge() -> None:
    assert ("edges.4.to", "dangling_edge") in rules(
        journey(GOOD_NODES, [*GOOD_EDGES, {"from": "remind", "to": "nowhere"}])
    )


def test_unreachable_node() -> None:
    nodes = [*GOOD_NODES, {"id": "orphan", "type": "exit"}]
    assert rules(journey(nodes, GOOD_EDGES)) == {("nodes.orphan", "reachable")}


def test_missing_branch() -> None:
    edges = [e for e in GOOD_EDGES if e.get("branch") != "timeout"]
    found = rules(journey(GOOD_NODES, edges))
    assert ("nodes.wait", "branch_complete") in found
    assert ("nodes.remind", "reachable") in found


def test_unknown_branch_on_a_condition() -> None:
    nodes = [
        {"id": "start", "type": "entry"},
        {
            "id": "vip",
            "type": "condition",
            "branches": [{"name": "yes", "where": [{"field": "traits.vip", "op": "eq", "value": True}]}],
        },
        {"id": "done", "type": "exit"},
    ]
    edges = [
        {"from": "start", "to": "vip"},
        {"from": "vip", "to": "done", "branch": "yes"},
        {"from": "vip", "to": "done", "branch": "no"},
    ]
    found = rules(journey(nodes, edges))
    assert ("nodes.vip", "branch_complete") in found  # 'else' missing
    assert ("nodes.vip", "unknown_branch") in found


def test_loops_must_pass_through_a_wait() -> None:
    nodes = [
        {"id": "start", "type": "entry"},
        {"id": "send", "type": "send", "channel": "email", "template_id": "x"},
        {
            "id": "again",
            "type": "condition",
            "branches": [{"name": "more", "where": [{"field": "traits.n", "op": "lt", "value": 3}]}],
        },
        {"id": "done", "type": "exit"},
    ]
    edges = [
        {"from": "start", "to": "send"},
        {"from": "send", "to": "again"},
        {"from": "again", "to": "send", "branch": "more"},
        {"from": "again", "to": "done", "branch": "else"},
    ]
    assert any(rule == "loop_through_wait" for _, rule in rules(journey(nodes, edges)))
    nodes.insert(2, {"id": "pause", "type": "delay", "duration": "P1D"})
    edges[1] = {"from": "send", "to": "pause"}
    edges.append({"from": "pause", "to": "again"})
    assert graph_errors(journey(nodes, edges)) == []


def test_node_fields_are_validated_by_pydantic() -> None:
    with pytest.raises(ValidationError):
        journey([{"id": "d", "type": "delay"}], [])
    with pytest.raises(ValidationError):
        journey(
            [
                {
                    "id": "s",
                    "type": "split",
                    "arms": [{"name": "a", "percent": 50}, {"name": "b", "percent": 40}],
                }
            ],
            [],
        )


def test_segment_style_durations_and_comparison_names_are_understood() -> None:
    """One habit serves both languages: `1h` as segments write it, `equals` for `eq`."""
    nodes = [dict(n) for n in GOOD_NODES]
    nodes[1] = {**nodes[1], "timeout": "1h"}
    nodes.insert(1, {"id": "pause", "type": "delay", "duration": "2d"})
    edges = [{"from": "start", "to": "pause"}, {"from": "pause", "to": "wait"}, *GOOD_EDGES[1:]]
    parsed = journey(nodes, edges)
    by_id = {n.id: n for n in parsed.nodes}
    assert by_id["wait"].timeout.total_seconds() == 3600  # type: ignore[union-attr]
    assert by_id["pause"].duration.days == 2  # type: ignore[union-attr]
    assert graph_errors(parsed) == []
    iso = journey([{**GOOD_NODES[0]}, {**GOOD_NODES[1], "timeout": "PT1H"}, *GOOD_NODES[2:]], GOOD_EDGES)
    assert {n.id: n for n in iso.nodes}["wait"].timeout == by_id["wait"].timeout  # type: ignore[union-attr]
    condition = journey(
        [
            GOOD_NODES[0],
            {
                "id": "pro",
                "type": "condition",
                "branches": [
                    {"name": "pro", "where": [{"field": "traits.plan", "op": "equals", "value": "pro"}]}
                ],
            },
            *GOOD_NODES[2:],
        ],
        [
            {"from": "start", "to": "pro"},
            {"from": "pro", "to": "remind", "branch": "pro"},
            {"from": "pro", "to": "done", "branch": "else"},
            {"from": "remind", "to": "done"},
        ],
    )
    branch = {n.id: n for n in condition.nodes}["pro"].branches[0]  # type: ignore[union-attr]
    assert branch.where[0].op == "eq"
    with pytest.raises(ValidationError):
        journey([GOOD_NODES[0], {**GOOD_NODES[1], "timeout": "1 fortnight"}, *GOOD_NODES[2:]], GOOD_EDGES)


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> set[tuple[str, str]]:
    return {(".".join(str(p) for p in e["loc"]), e["type"]) for e in exc.value.errors()}


def test_times_of_day_take_no_utc_offset() -> None:
    """They are in each customer's timezone: an offset meant nothing, and in quiet hours it made every
    send raise TypeError (naive vs aware times)."""
    with pytest.raises(ValidationError) as exc:
        journey(GOOD_NODES, GOOD_EDGES, messaging={"quiet_hours": {"start": "22:00Z", "end": "07:00"}})
    assert errors_of(exc) == {("messaging.quiet_hours.window.start", "time_of_day")}
    with pytest.raises(ValidationError) as exc:
        journey([{"id": "d", "type": "delay", "until_time": "09:00+02:00"}], [])
    assert errors_of(exc) == {("nodes.0.delay.until_time", "time_of_day")}
    with pytest.raises(ValidationError) as exc:
        JourneyDefinition.model_validate(
            {
                "name": "t",
                "entry": {
                    "type": "schedule",
                    "segment_id": "s",
                    "at": "2026-01-06T00:00:00Z",
                    "local_time": "09:00Z",
                },
                "nodes": GOOD_NODES,
                "edges": GOOD_EDGES,
            }
        )
    assert errors_of(exc) == {("entry.schedule.local_time", "time_of_day")}
    # A definition stored before is read as the engine used it: the offset dropped.
    stored = JourneyDefinition.model_validate(
        {
            "name": "t",
            "entry": {"type": "event", "event": "Signed Up"},
            "messaging": {"quiet_hours": {"start": "22:00Z", "end": "07:00+02:00"}},
            "nodes": GOOD_NODES,
            "edges": GOOD_EDGES,
        },
        context={"stored": True},
    )
    assert stored.messaging is not None and isinstance(stored.messaging.quiet_hours, QuietWindow)
    window = stored.messaging.quiet_hours
    assert (window.start, window.end) == (time(22), time(7))
    assert QuietHours(window.start, window.end).window_end(
        datetime(2026, 1, 5, 23, tzinfo=UTC), ZoneInfo("UTC")
    )


def test_platform_quiet_hours_take_no_utc_offset() -> None:
    with pytest.raises(ValidationError):
        JourneyEngineSettings(quiet_hours_start="22:00Z", quiet_hours_end="07:00")  # type: ignore[arg-type]
    assert (
        JourneyEngineSettings(quiet_hours_start="22:00", quiet_hours_end="07:00")
        .messaging_rules()
        .quiet_hours
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({"id": "d", "type": "delay", "duration": 0}, "nodes.0.delay.duration"),
        ({"id": "d", "type": "delay", "duration": -60}, "nodes.0.delay.duration"),
        ({"id": "d", "type": "delay", "duration": "-PT1H"}, "nodes.0.delay.duration"),
        ({"id": "d", "type": "delay", "duration": "P9999999D"}, "nodes.0.delay.duration"),
        (
            {"id": "d", "type": "delay", "until_trait": "renewal", "offset": "P9999999D"},
            "nodes.0.delay.offset",
        ),
        ({"id": "w", "type": "wait_event", "event": "x", "timeout": "0s"}, "nodes.0.wait_event.timeout"),
        (
            {"id": "w", "type": "wait_segment", "segment_id": "s", "timeout": "P3651D"},
            "nodes.0.wait_segment.timeout",
        ),
        (
            {"id": "w", "type": "wait_message", "send_node": "m", "timeout": -1},
            "nodes.0.wait_message.timeout",
        ),
    ],
)
def test_every_wait_is_positive_and_at_most_ten_years(node: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        journey([node], [])
    assert errors_of(exc) == {(field, "duration_range")}


def test_goal_windows_offsets_and_reentry_days_are_bounded() -> None:
    for goal in ({"event": "x", "within": "P9999999D"}, {"event": "x", "within": 0}):
        with pytest.raises(ValidationError) as exc:
            journey(GOOD_NODES, GOOD_EDGES, goal=goal)
        assert errors_of(exc) == {("goal.within", "duration_range")}
    with pytest.raises(ValidationError):
        journey(GOOD_NODES, GOOD_EDGES, reentry={"policy": "after", "days": 1e9})
    # Before a date is fine: "3 days before the renewal".
    parsed = journey([{"id": "d", "type": "delay", "until_trait": "renewal", "offset": "-P3D"}], [])
    assert parsed.nodes[0].offset.days == -3  # type: ignore[union-attr]
    # A stored definition is read as the engine used it, a huge wait capped so it cannot overflow.
    stored = JourneyDefinition.model_validate(
        {
            "name": "t",
            "entry": {"type": "event", "event": "x"},
            "nodes": [{"id": "d", "type": "delay", "duration": "P9999999D"}],
            "edges": [],
        },
        context={"stored": True},
    )
    assert stored.nodes[0].duration.days == 3650  # type: ignore[union-attr]


def test_a_loop_in_a_long_chain_is_found_without_recursion() -> None:
    """graph_errors walks the graph with a stack of its own: a recursive walk overflowed Python's
    stack on ~1,000 chained nodes (the API caps journeys at MAX_NODES, the check holds well past it)."""
    adapter: TypeAdapter[Any] = TypeAdapter(Node)
    n = 5000
    nodes = [adapter.validate_python({"id": "start", "type": "entry"})] + [
        adapter.validate_python({"id": f"n{i}", "type": "update_trait", "traits": {"i": i}}) for i in range(n)
    ]
    edges = [Edge.model_validate({"from": "start", "to": "n0"})] + [
        Edge.model_validate({"from": f"n{i}", "to": f"n{(i + 1) % n}"}) for i in range(n)
    ]
    definition = JourneyDefinition.model_construct(
        name="long", entry=EventEntry(type="event", event="x"), nodes=nodes, edges=edges
    )
    assert {rule for _, rule in rules(definition)} == {"loop_through_wait"}


def test_json_problem_names_what_cannot_be_written_as_json() -> None:
    assert json_problem({"a": [1, 2.5, "x", None, True, {"b": 2**64 - 1, "c": -(2**63)}]}) is None
    assert json_problem({"a": [1, {"b": 2**64}]}) == ("a.1.b", "json_integer_range", ANY)
    assert json_problem({"a": -(2**63) - 1}) == ("a", "json_integer_range", ANY)
    assert json_problem({"a": float("nan")}) == ("a", "json_finite_number", ANY)
    assert json_problem({"a": "x\x00"}) == ("a", "no_nul_character", ANY)
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    assert json_problem({"a": deep})[1] == "max_depth"  # type: ignore[index]


def test_values_that_json_cannot_hold_are_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        journey([{"id": "t", "type": "update_trait", "traits": {"big": 2**64}}], [])
    assert errors_of(exc) == {("nodes.0.update_trait.traits", "json_integer_range")}
    assert "big" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        journey(
            [{"id": "m", "type": "send", "channel": "email", "template_id": "x", "data": {"n": [2**70]}}], []
        )
    assert errors_of(exc) == {("nodes.0.send.data", "json_integer_range")}
    with pytest.raises(ValidationError) as exc:
        journey(
            GOOD_NODES, GOOD_EDGES, goal={"event": "x", "where": [{"field": "n", "op": "eq", "value": 2**64}]}
        )
    assert errors_of(exc) == {("goal.where.0.value", "json_integer_range")}


def test_definitions_stored_before_the_new_limits_are_still_read() -> None:
    """A journey saved before a limit existed must keep running: the engine reads stored definitions
    with `context={"stored": True}`, and one it cannot read strands its customers and drops its
    schedule. Each limit here refuses the same document on save."""
    deep: Any = 1
    for _ in range(70):
        deep = {"x": deep}
    chain = [{"id": f"d{i}", "type": "delay", "duration": "P1D"} for i in range(600)]
    raw = {
        "name": "old",
        "entry": {"type": "schedule", "segment_id": "s", "at": "3100-01-01T00:00:00Z", "every": "PT10S"},
        "reentry": {"policy": "after", "days": 9999},
        "nodes": [
            {"id": "start", "type": "entry"},
            *chain,
            {"id": "t", "type": "update_trait", "traits": deep},
            {"id": "e", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "d0"},
            *({"from": f"d{i}", "to": f"d{i + 1}"} for i in range(599)),
            {"from": "d599", "to": "t"},
            {"from": "t", "to": "e"},
        ],
    }
    with pytest.raises(ValidationError) as exc:
        JourneyDefinition.model_validate(raw)
    assert {rule for _, rule in errors_of(exc)} == {"duration_range", "max_depth", "value_error"}
    shallow = {
        **raw,
        "nodes": [
            *raw["nodes"][:-2],
            {"id": "t", "type": "update_trait", "traits": {"a": 1}},
            raw["nodes"][-1],
        ],
    }
    with pytest.raises(ValidationError) as exc:
        JourneyDefinition.model_validate(shallow)
    assert ("nodes", "too_long") in errors_of(exc)
    stored = JourneyDefinition.model_validate(raw, context={"stored": True})
    assert len(stored.nodes) == 603 and stored.reentry.days == 3650
    assert rules(stored) == set()


def test_message_data_whose_traits_or_journey_is_not_an_object_is_refused() -> None:
    """The notifier fails every message whose template data `traits` or `journey` is not an object."""
    for node in (
        {"id": "m", "type": "send", "channel": "email", "template_id": "x", "data": {"traits": "vip"}},
        {"id": "w", "type": "webhook", "url": "https://x.test/h", "data": {"journey": [1]}},
    ):
        with pytest.raises(ValidationError) as exc:
            journey([node], [])
        assert {rule for _, rule in errors_of(exc)} == {"object"}
    ok = journey(
        [{"id": "m", "type": "send", "channel": "email", "template_id": "x", "data": {"traits": {}}}], []
    )
    assert ok.nodes[0].data == {"traits": {}}  # type: ignore[union-attr]


def test_names_are_limited_in_bytes_except_in_definitions_stored_before() -> None:
    long_id = "ü" * 513  # 513 characters, 1,026 bytes
    nodes = [
        {"id": "start", "type": "entry"},
        {"id": long_id, "type": "wait_message", "send_node": long_id, "timeout": "P1D"},
    ]
    edges = [{"from": "start", "to": long_id}]
    with pytest.raises(ValidationError) as exc:
        journey(nodes, edges, correlation_key="k" * 1025)
    assert errors_of(exc) == {
        ("nodes.1.wait_message.id", "max_bytes"),
        ("nodes.1.wait_message.send_node", "max_bytes"),
        ("edges.0.to", "max_bytes"),
        ("correlation_key", "max_bytes"),
    }
    raw = {"name": "t", "entry": {"type": "event", "event": "E"}, "nodes": nodes, "edges": edges}
    stored = JourneyDefinition.model_validate(raw, context={"stored": True})
    assert stored.nodes[1].id == long_id
    # 1,024 bytes; a 60-character Japanese node id (180 bytes) that the 128-byte limit refused.
    assert journey([{"id": "ü" * 512, "type": "entry"}], []).nodes[0].id == "ü" * 512
    assert journey([{"id": "登録" * 30, "type": "entry"}], []).nodes[0].id == "登録" * 30


def test_template_ids_and_topics_are_what_the_notifier_takes() -> None:
    def send(template_id: str, topic: str | None = None) -> list[dict[str, Any]]:
        node = {"id": "m", "type": "send", "channel": "email", "template_id": template_id}
        return [node | {"subscription_topic": topic}] if topic else [node]

    assert NOTIFIER_NAME.pattern == TEMPLATE_NAME == TOPIC_NAME  # one rule for both services
    for ok in ("welcome", "Cart-Reminder_2.fr", "x" * 128):
        journey(send(ok, ok), [])
    # A final newline too: `re`'s `$` matches before one, the notifier's pattern does not.
    bad_names = (("welcome email", None), ("x" * 129, None), ("-x", None), ("é", None), ("t", "*"))
    for bad, topic in (*bad_names, ("welcome\n", None), ("t", "news\n")):
        with pytest.raises(ValidationError) as exc:
            journey(send(bad, topic), [])
        field = "subscription_topic" if topic else "template_id"
        assert errors_of(exc) == {(f"nodes.0.send.{field}", "string_pattern_mismatch")}, bad
    # Segment ids and stages as the segmenter makes them (at most 128 bytes).
    with pytest.raises(ValidationError) as exc:
        journey([{"id": "s", "type": "entry"}], [], entry={"type": "segment", "segment_id": "s" * 129})
    assert errors_of(exc) == {("entry.segment.segment_id", "max_bytes")}
    stored = {
        "name": "t",
        "entry": {"type": "event", "event": "E"},
        "nodes": send("welcome email"),
        "edges": [],
    }
    [node] = JourneyDefinition.model_validate(stored, context={"stored": True}).nodes
    assert node.template_id == "welcome email"  # type: ignore[union-attr]


def ab_split(
    holdout_to: str, *extra_nodes: dict[str, Any], extra_edges: tuple[dict[str, Any], ...] = ()
) -> JourneyDefinition:
    return journey(
        [
            {"id": "start", "type": "entry"},
            {
                "id": "ab",
                "type": "split",
                "arms": [
                    {"name": "mail", "percent": 50},
                    {"name": "control", "percent": 50, "holdout": True},
                ],
            },
            {"id": "hi", "type": "send", "channel": "email", "template_id": "hi"},
            *extra_nodes,
            {"id": "done", "type": "exit"},
        ],
        [
            {"from": "start", "to": "ab"},
            {"from": "ab", "to": "hi", "branch": "mail"},
            {"from": "ab", "to": holdout_to, "branch": "control"},
            {"from": "hi", "to": "done"},
            *extra_edges,
        ],
    )


def test_a_holdout_arm_that_can_reach_a_send_is_warned_about() -> None:
    """Saved (the graph is valid), but its customers get messages: the comparison against the
    holdout measures nothing."""
    assert definition_warnings(ab_split("done")) == []
    [warning] = definition_warnings(ab_split("hi"))
    assert (warning.field, warning.rule) == ("nodes.ab", "holdout_sends")
    assert "'control'" in warning.message and "'hi'" in warning.message
    # Reached through a wait and a condition, a webhook counts too.
    later = ab_split(
        "wait",
        {"id": "wait", "type": "delay", "duration": "P1D"},
        {
            "id": "vip",
            "type": "condition",
            "branches": [{"name": "gold", "where": [{"field": "plan", "op": "eq", "value": "gold"}]}],
        },
        {"id": "hook", "type": "webhook", "url": "https://example.com/h"},
        extra_edges=(
            {"from": "wait", "to": "vip"},
            {"from": "vip", "to": "hook", "branch": "gold"},
            {"from": "vip", "to": "done", "branch": "else"},
            {"from": "hook", "to": "done"},
        ),
    )
    assert graph_errors(later) == []
    assert [(w.rule, "'hook'" in w.message) for w in definition_warnings(later)] == [("holdout_sends", True)]
    # Back at the same split a customer takes the same arm again: a loop to it reaches no other arm.
    loop = ab_split(
        "pause",
        {"id": "pause", "type": "delay", "duration": "P7D"},
        extra_edges=({"from": "pause", "to": "ab"},),
    )
    assert graph_errors(loop) == []
    assert definition_warnings(loop) == []
