"""Compiled rules (`domain.compiled`, the real-time path) agree with the interpreter
(`domain.evaluation`, the reference): same verdict and same next change, on generated rules of every
node and operator over generated profiles whose values are of every JSON type."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest

from services.segmenter.domain.catalog import compile_segment
from services.segmenter.domain.compiled import compile_next_change, compile_predicate
from services.segmenter.domain.evaluation import evaluate, next_change_at
from services.segmenter.domain.profile import EventAggregate, Occurrence, ProfileSnapshot
from services.segmenter.domain.rules import PROFILE_FIELDS, ComparisonOp, InvalidRule, Rule, parse_rule

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
EVENTS = ["Order Completed", "Signed In", "Product Viewed"]
TRAITS = ["plan", "age", "score", "tags", "vip", "seen_at", "account.tier", "items.0.sku", "nothing"]
PROPERTIES = ["total", "category", "gift", "item.sku", "tags"]
DURATIONS = ["1h", "2d", "30d", "P1W", 3600, "PT12H"]
OPS = list(get_args(ComparisonOp))


def a_time(rnd: random.Random) -> datetime:
    if rnd.random() < 0.6:  # often on an edge: another such time, or `now` minus a duration
        edge = rnd.choice([0, -1, -12, -48, -168, -720, 72])
        return NOW + timedelta(hours=edge)
    return NOW + timedelta(hours=rnd.randint(-60 * 24, 5 * 24), seconds=rnd.choice([0, 1, 59]))


def a_written_time(rnd: random.Random, t: datetime) -> str:
    """`t` as a rule may write it: with a zone, without one (UTC), or only the day."""
    return rnd.choice([t.isoformat(), t.replace(tzinfo=None).isoformat(), t.date().isoformat()])


def a_value(rnd: random.Random) -> Any:
    kind = rnd.randrange(10)
    if kind == 0:
        return rnd.choice(["pro", "free", "gold", "a1", "beta", "", "Pro"])
    if kind == 1:  # past 2**53 too, where not every integer is a double
        return rnd.choice([0, 1, 30, 34, -2, 100, 2**53 + 1, 1152921504606847000])
    if kind == 2:
        return rnd.choice([0.5, 1.0, 30.0, 7.5, 2.0**53, 1.152921504606847e18])
    if kind == 3:
        return rnd.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return rnd.choice([["beta", "vip"], [1, 2], [], ["pro"], [True]])
    if kind == 6:
        return {"tier": rnd.choice(["gold", "silver", 1]), "sku": "a1"}
    if kind == 7:  # a date as a trait holds it: text, with or without a zone, or only the day
        return a_written_time(rnd, a_time(rnd))
    if kind == 8:
        return [{"sku": rnd.choice(["a1", "b2"])}]
    return "2026-02-30T00:00:00"  # looks like a date, is not one


def a_comparison(rnd: random.Random) -> dict[str, Any]:
    op = rnd.choice(OPS)
    c: dict[str, Any] = {"op": op}
    if op in ("equals", "not_equals", "contains"):
        c["value"] = a_value(rnd)
    elif op == "in":
        c["values"] = [a_value(rnd) for _ in range(rnd.randint(0, 3))]
    elif op in ("gt", "gte", "lt", "lte"):
        c["value"] = rnd.choice([0, 30, 7.5, -1, "30", True, 2**53, 1.152921504606847e18])
    elif op == "within":
        c["duration"] = rnd.choice(DURATIONS)
    elif op in ("before", "after"):
        if rnd.random() < 0.5:
            c["ago"] = rnd.choice(DURATIONS)
        else:
            c["value"] = a_written_time(rnd, a_time(rnd))
    return c


def a_rule(rnd: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rnd.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return {"trait": rnd.choice(TRAITS), **a_comparison(rnd)}
    if kind == 1:
        return {"profile": rnd.choice(sorted(PROFILE_FIELDS)), **a_comparison(rnd)}
    if kind in (2, 3):
        rule: dict[str, Any] = {"performed": rnd.choice(EVENTS)}
        if rnd.random() < 0.5:
            rule["where"] = [
                {"property": rnd.choice(PROPERTIES), **a_comparison(rnd)} for _ in range(rnd.randint(1, 2))
            ]
        window = rnd.randrange(3)
        if window == 1:
            rule["within"] = rnd.choice(DURATIONS)
        elif window == 2:
            start = a_time(rnd)
            end = start + timedelta(days=9)
            rule["between"] = {"from": a_written_time(rnd, start), "to": a_written_time(rnd, end)}
        if rnd.random() < 0.7:
            rule["count"] = {
                "op": rnd.choice(["at_least", "at_most", "exactly"]),
                "value": rnd.randint(0, 3),
            }
        return rule
    if kind == 4:
        return {"not_performed": rnd.choice(EVENTS), "since": rnd.choice(DURATIONS)}
    if kind == 5:
        rule = {"last_performed": rnd.choice(EVENTS), "op": rnd.choice(["before", "after"])}
        if rnd.random() < 0.5:
            rule["ago"] = rnd.choice(DURATIONS)
        else:
            rule["value"] = a_written_time(rnd, a_time(rnd))
        return rule
    if kind == 6:
        return {"member_of": rnd.choice(["seg_a", "seg_b"])}
    if kind == 7:
        return {
            "random_bucket": {"buckets": rnd.choice([2, 10, 100]), "below": rnd.randint(0, 6), "salt": "h"}
        }
    if kind == 8:
        return {
            "recommendation": rnd.choice(["cross_sell", "upsell"]),
            "category": rnd.choice([None, "shoes"]),
        }
    if kind == 9:
        return {"and": [a_rule(rnd, depth + 1) for _ in range(rnd.randint(1, 3))]}
    if kind == 10:
        return {"or": [a_rule(rnd, depth + 1) for _ in range(rnd.randint(1, 3))]}
    return {"not": a_rule(rnd, depth + 1)}


def a_profile(rnd: random.Random, i: int) -> ProfileSnapshot:
    traits: dict[str, Any] = {}
    for name in ("plan", "age", "score", "tags", "vip", "seen_at", "account", "items", "nothing"):
        if rnd.random() < 0.8:
            traits[name] = a_value(rnd)
    fields: dict[str, Any] = {}
    for name, kind in PROFILE_FIELDS.items():
        if rnd.random() < 0.2:
            fields[name] = None
        elif kind == "number":
            fields[name] = rnd.choice([0, 2, 3.5, 500, 1000])
        elif kind == "time":
            fields[name] = a_time(rnd)
        else:
            fields[name] = rnd.choice(["onboarding", "growth", "at_risk", "pro"])
    events: dict[str, EventAggregate] = {}
    timeline: dict[str, list[Occurrence]] = {}
    for name in EVENTS:
        if rnd.random() < 0.25:
            continue
        occurrences = [
            Occurrence(
                a_time(rnd),
                {
                    "total": rnd.choice([15, 40, 80.5, "80", None]),
                    "category": rnd.choice(["shoes", "books"]),
                    "gift": rnd.choice([True, False, 1]),
                    "item": {"sku": rnd.choice(["a1", "b2"])},
                    "tags": rnd.choice([["gift"], []]),
                },
            )
            for _ in range(rnd.randint(1, 4))
        ]
        stamps = [o.timestamp for o in occurrences]
        events[name] = EventAggregate(len(occurrences), min(stamps), max(stamps))
        timeline[name] = occurrences
    return ProfileSnapshot(
        customer_id=f"c{i}",
        traits=traits,
        fields=fields,
        events=events,
        timeline=timeline,
        memberships={s for s in ("seg_a", "seg_b") if rnd.random() < 0.5},
        recommendations={"cross_sell": {"*", "shoes"}} if rnd.random() < 0.5 else {},
    )


def generated_rules(seed: int, n: int) -> list[Rule]:
    rnd = random.Random(seed)
    rules: list[Rule] = []
    while len(rules) < n:
        try:
            rules.append(parse_rule(a_rule(rnd)))
        except InvalidRule:
            continue  # the generator is looser than the validator
    return rules


@pytest.mark.parametrize("seed", range(4))
def test_compiled_rules_agree_with_the_interpreter(seed: int) -> None:
    rnd = random.Random(1000 + seed)
    profiles = [a_profile(rnd, i) for i in range(40)]
    moments = [NOW, NOW + timedelta(days=3), NOW - timedelta(days=20)]
    checked = 0
    for rule in generated_rules(seed, 600):
        holds, next_change = compile_predicate(rule), compile_next_change(rule)
        for p in profiles:
            now = rnd.choice(moments)
            assert holds(p, now) == evaluate(rule, p, now), (rule, p)
            assert next_change(p, now) == next_change_at(rule, p, now), (rule, p)
            checked += 1
    assert checked == 600 * 40


def test_generated_rules_cover_every_node_and_operator() -> None:
    """The agreement above means something only if the generator reaches every case."""
    dumped = [str(r.model_dump(by_alias=True)) for r in generated_rules(0, 600)]
    for needle in [*(f"'op': '{op}'" for op in OPS), "'and'", "'or'", "'not'", "'within'", "'between'"]:
        assert any(needle in d for d in dumped), needle
    for key in ("not_performed", "last_performed", "member_of", "random_bucket", "recommendation", "where"):
        assert any(f"'{key}'" in d for d in dumped), key


def test_a_segment_carries_its_compiled_rule() -> None:
    seg = compile_segment("seg_x", "x", 1, {"trait": "plan", "op": "equals", "value": "pro"})
    assert seg.holds(ProfileSnapshot("c1", traits={"plan": "pro"}), NOW) is True
    assert seg.holds(ProfileSnapshot("c1", traits={"plan": "free"}), NOW) is False
    assert seg.next_change_at(ProfileSnapshot("c1"), NOW) is None
