"""Walking a graph: waits, branches, timezones, splits, caps and quiet hours, without any I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from services.journey_engine.domain.definition import Graph, JourneyDefinition, JourneyMessaging
from services.journey_engine.domain.timing import QuietHours, next_time_of_day, zone
from services.journey_engine.domain.walker import (
    CapRule,
    CustomerView,
    EventArrived,
    InstanceView,
    MessageWithheld,
    MessagingRules,
    Outcome,
    RequestMessage,
    Start,
    StatusArrived,
    TimerFired,
    Walker,
    dry_run,
    message_id,
)

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday


def graph(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], **extra: Any) -> Graph:
    body = {"name": "t", "entry": {"type": "event", "event": "Product Added"}, "nodes": nodes, "edges": edges}
    return Graph(JourneyDefinition.model_validate(body | extra))


CART = graph(
    [
        {"id": "start", "type": "entry"},
        {
            "id": "wait",
            "type": "wait_event",
            "event": "Order Completed",
            "match_correlation": True,
            "timeout": "PT1H",
        },
        {"id": "remind", "type": "send", "channel": "email", "template_id": "cart"},
        {"id": "done", "type": "exit"},
    ],
    [
        {"from": "start", "to": "wait"},
        {"from": "wait", "to": "done", "branch": "matched"},
        {"from": "wait", "to": "remind", "branch": "timeout"},
        {"from": "remind", "to": "done"},
    ],
    correlation_key="cart_id",
)


def step(
    g: Graph,
    state: InstanceView,
    event: Any,
    now: datetime = NOW,
    customer: CustomerView | None = None,
    rules: MessagingRules | None = None,
) -> Outcome | None:
    return Walker(g, state, customer or CustomerView("c1"), rules or MessagingRules(), now).react(event)


def after(state: InstanceView, outcome: Outcome) -> InstanceView:
    return InstanceView(
        state.instance_id,
        state.journey_id,
        state.version,
        outcome.node_id,
        state.entered_at,
        state.correlation,
        outcome.context,
        outcome.wait,
    )


def fresh(g: Graph, correlation: str = "") -> InstanceView:
    return InstanceView("i1", "j1", 1, g.entry_id, NOW, correlation)


def test_cart_reminder_after_timeout() -> None:
    state = fresh(CART, "cart-1")
    waiting = step(CART, state, Start())
    assert waiting is not None and waiting.node_id == "wait" and waiting.due_at == NOW + timedelta(hours=1)
    fired = step(CART, after(state, waiting), TimerFired(), NOW + timedelta(hours=1))
    assert fired is not None and fired.status == "exited"
    [request] = fired.effects
    assert isinstance(request, RequestMessage)
    assert request.message_id == message_id("j1", 1, "i1", "remind") and request.template_id == "cart"


def test_cart_order_with_same_cart_exits_without_reminder() -> None:
    state = fresh(CART, "cart-1")
    waiting = step(CART, state, Start())
    assert waiting is not None
    other_cart = EventArrived(
        "Order Completed", {"event": "Order Completed", "properties": {"cart_id": "cart-2"}}
    )
    assert step(CART, after(state, waiting), other_cart) is None
    same_cart = EventArrived(
        "Order Completed", {"event": "Order Completed", "properties": {"cart_id": "cart-1"}}
    )
    done = step(CART, after(state, waiting), same_cart)
    assert done is not None and done.status == "exited" and done.effects == []
    assert ("wait", "passed") in done.counts and ("done", "exited") in done.counts


def test_delay_until_time_of_day_in_customer_timezone_on_weekdays() -> None:
    tz = zone("America/New_York")
    # Friday 23:00 New York -> next allowed weekday (Mon) 09:00 New York.
    friday_night = datetime(2026, 1, 10, 4, 0, tzinfo=UTC)
    due = next_time_of_day(friday_night, time(9, 0), tz, ["mon", "tue", "wed", "thu", "fri"])
    assert due.astimezone(tz) == datetime(2026, 1, 12, 9, 0, tzinfo=tz)


def test_delay_until_trait_date_plus_offset() -> None:
    g = graph(
        [
            {"id": "start", "type": "entry"},
            {"id": "d", "type": "delay", "until_trait": "trial_ends_at", "offset": "-P1D"},
            {"id": "done", "type": "exit"},
        ],
        [{"from": "start", "to": "d"}, {"from": "d", "to": "done"}],
    )
    customer = CustomerView("c1", traits={"trial_ends_at": "2026-01-20"}, timezone="Europe/Paris")
    out = step(g, fresh(g), Start(), customer=customer)
    assert out is not None and out.due_at == datetime(2026, 1, 19, 0, 0, tzinfo=zone("Europe/Paris"))


def test_condition_multiway_and_split_is_stable() -> None:
    g = graph(
        [
            {"id": "start", "type": "entry"},
            {
                "id": "tier",
                "type": "condition",
                "branches": [
                    {"name": "gold", "where": [{"field": "traits.spend", "op": "gte", "value": 1000}]},
                    {"name": "vip_segment", "where": [{"field": "segment", "op": "member", "value": "vips"}]},
                ],
            },
            {
                "id": "ab",
                "type": "split",
                "arms": [
                    {"name": "a", "percent": 45},
                    {"name": "b", "percent": 45},
                    {"name": "control", "percent": 10, "holdout": True},
                ],
            },
            {"id": "done", "type": "exit"},
        ],
        [
            {"from": "start", "to": "tier"},
            {"from": "tier", "to": "done", "branch": "gold"},
            {"from": "tier", "to": "done", "branch": "vip_segment"},
            {"from": "tier", "to": "ab", "branch": "else"},
            {"from": "ab", "to": "done", "branch": "a"},
            {"from": "ab", "to": "done", "branch": "b"},
            {"from": "ab", "to": "done", "branch": "control"},
        ],
    )
    gold = step(g, fresh(g), Start(), customer=CustomerView("c1", traits={"spend": 1500}))
    assert gold is not None and "arms" not in gold.context
    vip = step(g, fresh(g), Start(), customer=CustomerView("c2", segments=frozenset({"vips"})))
    assert vip is not None and any("vip_segment" in p.note for p in vip.path)
    arms: Counter[str] = Counter()
    for n in range(4000):
        out = step(g, fresh(g), Start(), customer=CustomerView(f"cust-{n}"))
        assert out is not None
        arms[out.context["arms"]["ab"]] += 1
    assert abs(arms["a"] / 4000 - 0.45) < 0.03 and abs(arms["control"] / 4000 - 0.10) < 0.02
    again = step(g, fresh(g), Start(), customer=CustomerView("cust-7"))
    assert (
        again is not None
        and again.context["arms"]["ab"]
        == step(g, fresh(g), Start(), customer=CustomerView("cust-7")).context["arms"]["ab"]
    )  # type: ignore[union-attr]


SEND_TWICE = graph(
    [
        {"id": "start", "type": "entry"},
        {"id": "s1", "type": "send", "channel": "email", "template_id": "one"},
        {"id": "s2", "type": "send", "channel": "email", "template_id": "two"},
        {"id": "done", "type": "exit"},
    ],
    [{"from": "start", "to": "s1"}, {"from": "s1", "to": "s2"}, {"from": "s2", "to": "done"}],
)


MAIL_THEN_CLICK = graph(
    [
        {"id": "start", "type": "entry"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "hello"},
        {"id": "pause", "type": "delay", "duration": "PT1H"},
        {
            "id": "clicked",
            "type": "wait_message",
            "send_node": "mail",
            "statuses": ["clicked"],
            "timeout": "P1D",
        },
        {"id": "done", "type": "exit"},
    ],
    [
        {"from": "start", "to": "mail"},
        {"from": "mail", "to": "pause"},
        {"from": "pause", "to": "clicked"},
        {"from": "clicked", "to": "done", "branch": "matched"},
        {"from": "clicked", "to": "done", "branch": "timeout"},
    ],
)


def test_a_wait_for_a_message_status_waits_for_the_id_the_message_got() -> None:
    """Migrated to version 2 during the delay, the instance still waits for version 1's mail."""
    sent = step(MAIL_THEN_CLICK, fresh(MAIL_THEN_CLICK), Start())
    assert sent is not None and sent.node_id == "pause"
    [request] = sent.effects
    assert isinstance(request, RequestMessage) and request.message_id == message_id("j1", 1, "i1", "mail")
    assert sent.context["message_ids"] == {"mail": request.message_id}
    migrated = replace(after(fresh(MAIL_THEN_CLICK), sent), version=2)
    waiting = step(MAIL_THEN_CLICK, migrated, TimerFired(), NOW + timedelta(hours=1))
    assert waiting is not None and waiting.wait is not None
    assert waiting.wait["message_id"] == request.message_id
    clicked = step(
        MAIL_THEN_CLICK,
        replace(migrated, node_id="clicked", context=waiting.context, wait=waiting.wait),
        StatusArrived(request.message_id, "clicked"),
    )
    assert clicked is not None and clicked.status == "exited" and ("clicked", "passed") in clicked.counts


def test_a_withheld_message_and_one_sent_before_ids_were_kept_are_waited_for_too() -> None:
    rules = MessagingRules(caps={"email": CapRule(1, "day")})
    capped = step(
        MAIL_THEN_CLICK,
        fresh(MAIL_THEN_CLICK),
        Start(),
        customer=CustomerView("c1", recent_sends={"email": [NOW]}),
        rules=rules,
    )
    assert capped is not None
    [withheld] = capped.effects
    assert isinstance(withheld, MessageWithheld) and withheld.status == "capped"
    assert capped.context["message_ids"] == {"mail": withheld.message_id}
    # No ids kept (an instance from before they were): the id of the version it left at its first
    # migration, else of its own version.
    legacy = replace(fresh(MAIL_THEN_CLICK), version=3, node_id="pause", context={"visits": {"mail": 2}})
    for context, version in (({"migrated_from": 1}, 1), ({}, 3)):
        state = replace(legacy, context={**legacy.context, **context})
        waiting = step(MAIL_THEN_CLICK, state, TimerFired(), NOW + timedelta(hours=1))
        assert waiting is not None and waiting.wait is not None
        assert waiting.wait["message_id"] == message_id("j1", version, "i1", "mail", 2)


MAIL_UNTIL_CLICKED = graph(
    [
        {"id": "start", "type": "entry"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "hello"},
        {"id": "pause", "type": "delay", "duration": "PT1H"},
        {
            "id": "clicked",
            "type": "wait_message",
            "send_node": "mail",
            "statuses": ["clicked"],
            "timeout": "P1D",
        },
        {"id": "done", "type": "exit"},
    ],
    [
        {"from": "start", "to": "mail"},
        {"from": "mail", "to": "pause"},
        {"from": "pause", "to": "clicked"},
        {"from": "clicked", "to": "done", "branch": "matched"},
        {"from": "clicked", "to": "mail", "branch": "timeout"},
    ],
)


def test_a_wait_after_a_send_by_the_release_before_waits_for_that_visits_message() -> None:
    """A loop mail -> delay -> wait -> mail: a replica of the release before sent the second mail (it
    counts the visit, keeps `message_ids` as they were); the wait after the delay waited for the
    first mail's id, and its click was never matched."""
    g = MAIL_UNTIL_CLICKED
    first = step(g, fresh(g), Start())
    assert first is not None and first.context["message_ids"] == {"mail": message_id("j1", 1, "i1", "mail")}
    # What the old replica's second visit left, on version 2 (migrated meanwhile): the visit counted,
    # the first visit's id still kept.
    context = {**first.context, "visits": {"mail": 2}, "migrated_from": 1}
    left = replace(fresh(g), version=2, node_id="pause", context=context)
    waiting = step(g, left, TimerFired(), NOW + timedelta(hours=1))
    assert waiting is not None and waiting.wait is not None
    # Its message's id: the instance's version (as the release before's wait expects), visit 2.
    assert waiting.wait["message_id"] == message_id("j1", 2, "i1", "mail", 2)
    # A kept id of this visit is trusted, whatever version it names.
    kept = {**context, "message_ids": {"mail": message_id("j1", 1, "i1", "mail", 2)}}
    waiting = step(g, replace(left, context=kept), TimerFired(), NOW + timedelta(hours=1))
    assert waiting is not None and waiting.wait is not None
    assert waiting.wait["message_id"] == message_id("j1", 1, "i1", "mail", 2)


def test_frequency_cap_per_local_day_withholds_with_reason() -> None:
    rules = MessagingRules(caps={"email": CapRule(1, "day")})
    customer = CustomerView("c1", timezone="Asia/Tokyo", recent_sends={"email": [NOW - timedelta(hours=2)]})
    out = step(SEND_TWICE, fresh(SEND_TWICE), Start(), customer=customer, rules=rules)
    assert out is not None
    assert [type(e) for e in out.effects] == [MessageWithheld, MessageWithheld]
    assert all(isinstance(e, MessageWithheld) and e.status == "capped" for e in out.effects)
    # Tokyo's day rolled over 18:00 local -> the next local day allows one again.
    tomorrow = datetime(2026, 1, 5, 15, 30, tzinfo=UTC)
    out = step(SEND_TWICE, fresh(SEND_TWICE), Start(), tomorrow, customer=customer, rules=rules)
    assert out is not None and [type(e) for e in out.effects] == [RequestMessage, MessageWithheld]


def test_quiet_hours_hold_then_send_at_window_end() -> None:
    rules = MessagingRules(quiet_hours=QuietHours(time(21), time(8)))
    customer = CustomerView("c1", timezone="Europe/Berlin")
    late = datetime(2026, 1, 5, 22, 0, tzinfo=UTC)  # 23:00 Berlin
    held = step(SEND_TWICE, fresh(SEND_TWICE), Start(), late, customer=customer, rules=rules)
    assert held is not None and held.node_id == "s1" and held.wait == {"kind": "quiet_hours"}
    assert held.due_at == datetime(2026, 1, 6, 7, 0, tzinfo=UTC)
    state = InstanceView("i1", "j1", 1, "s1", NOW, "", held.context, held.wait)
    sent = step(SEND_TWICE, state, TimerFired(), held.due_at, customer=customer, rules=rules)
    assert sent is not None and sent.status == "exited" and len(sent.effects) == 2
    skip = MessagingRules(quiet_hours=QuietHours(time(21), time(8)), quiet_mode="skip")
    skipped = step(SEND_TWICE, fresh(SEND_TWICE), Start(), late, customer=customer, rules=skip)
    assert skipped is not None and all(
        isinstance(e, MessageWithheld) and e.status == "skipped" for e in skipped.effects
    )


def test_transactional_bypasses_caps_and_quiet_hours() -> None:
    g = Graph(SEND_TWICE.definition.model_copy(update={"category": "transactional"}))
    rules = MessagingRules(caps={"email": CapRule(0, "week")}, quiet_hours=QuietHours(time(0), time(23, 59)))
    out = step(g, fresh(g), Start(), customer=CustomerView("c1"), rules=rules)
    assert out is not None and [type(e) for e in out.effects] == [RequestMessage, RequestMessage]


def test_dry_run_explains_the_path() -> None:
    out = dry_run(CART, CustomerView("c1"), MessagingRules(), NOW)
    assert [p.node_id for p in out.path] == ["start", "wait", "remind", "done"]
    assert "assuming it times out" in out.path[1].note


def test_a_journey_sets_its_own_quiet_hours_and_caps() -> None:
    """Over the platform's rules: `"off"` sends at any hour, a window of its own applies instead, and
    `frequency_caps: "ignore"` sends past the platform's caps."""
    platform = MessagingRules(caps={"email": CapRule(0, "week")}, quiet_hours=QuietHours(time(21), time(8)))
    customer = CustomerView("c1", timezone="Europe/Berlin")
    late = datetime(2026, 1, 5, 22, 0, tzinfo=UTC)  # 23:00 Berlin

    def with_messaging(messaging: dict[str, Any]) -> Graph:
        return Graph(
            SEND_TWICE.definition.model_copy(update={"messaging": JourneyMessaging.model_validate(messaging)})
        )

    held = step(SEND_TWICE, fresh(SEND_TWICE), Start(), late, customer=customer, rules=platform)
    assert held is not None and held.wait == {"kind": "quiet_hours"}  # the platform's rules

    anytime = with_messaging({"quiet_hours": "off", "frequency_caps": "ignore"})
    sent = step(anytime, fresh(anytime), Start(), late, customer=customer, rules=platform)
    assert sent is not None and [type(e) for e in sent.effects] == [RequestMessage, RequestMessage]

    own = with_messaging(
        {"quiet_hours": {"start": "23:30", "end": "06:00", "mode": "skip"}, "frequency_caps": "ignore"}
    )
    at_23 = step(own, fresh(own), Start(), late, customer=customer, rules=platform)
    assert at_23 is not None and [type(e) for e in at_23.effects] == [RequestMessage, RequestMessage]
    at_midnight = step(own, fresh(own), Start(), late + timedelta(hours=1), customer=customer, rules=platform)
    assert at_midnight is not None and all(
        isinstance(e, MessageWithheld) and e.status == "skipped" for e in at_midnight.effects
    )
    capped = with_messaging({"quiet_hours": "off"})  # the platform's caps still hold
    out = step(capped, fresh(capped), Start(), late, customer=customer, rules=platform)
    assert out is not None and all(isinstance(e, MessageWithheld) for e in out.effects)


def test_a_journeys_quiet_window_must_be_one() -> None:
    with pytest.raises(ValidationError):
        JourneyMessaging.model_validate({"quiet_hours": {"start": "21:00", "end": "21:00"}})
    with pytest.raises(ValidationError):
        JourneyMessaging.model_validate({"quiet_hours": "sometimes"})
