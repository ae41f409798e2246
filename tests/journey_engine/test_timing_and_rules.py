"""Welcome series in the customer's timezone, goals, frequency caps and quiet hours across journeys."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time, timedelta
from typing import Any

from tests.journey_engine.harness import ADMIN, engine_running


def linear(name: str, entry_event: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """entry -> steps in order -> exit."""
    nodes = [{"id": "start", "type": "entry"}, *steps, {"id": "done", "type": "exit"}]
    edges = [{"from": a["id"], "to": b["id"]} for a, b in itertools.pairwise(nodes)]
    return {
        "name": name,
        "entry": {"type": "event", "event": entry_event},
        "nodes": nodes,
        "edges": edges,
    } | extra


ALWAYS = {"policy": "always"}
WELCOME = linear(
    "Welcome",
    "Signed Up",
    [
        {"id": "welcome", "type": "send", "channel": "email", "template_id": "welcome"},
        {
            "id": "morning",
            "type": "delay",
            "until_time": "10:00",
            "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        },
        {"id": "tips", "type": "send", "channel": "email", "template_id": "tips"},
        {"id": "two_days", "type": "delay", "duration": "P2D"},
        {"id": "offer", "type": "send", "channel": "email", "template_id": "offer"},
    ],
)


async def test_welcome_series_delays_in_customer_timezone(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.profile("la", {"email": "la@example.com", "timezone": "America/Los_Angeles"})
        await h.profile("tokyo", {"email": "tk@example.com", "timezone": "Asia/Tokyo"})
        jid = await h.journey(WELCOME)
        # Monday 09:00 UTC = 01:00 in Los Angeles, 18:00 in Tokyo.
        await h.track("la", "Signed Up")
        await h.track("tokyo", "Signed Up")
        templates = lambda msgs: sorted((m["customer_id"], m["template_id"]) for m in msgs)  # noqa: E731
        assert templates(await h.requests(until=lambda m: len(m) >= 2)) == [
            ("la", "welcome"),
            ("tokyo", "welcome"),
        ]

        # Tokyo's next 10:00 is Tuesday 10:00 JST = Tuesday 01:00 UTC; LA's is Monday 10:00 PST = 18:00 UTC.
        assert await h.advance(timedelta(hours=8, minutes=59)) == 0
        assert await h.advance(timedelta(minutes=1)) == 1
        assert ("la", "tips") in templates(await h.requests(until=lambda m: len(m) >= 3))
        h.clock.set(datetime(2026, 1, 6, 0, 59, tzinfo=UTC))
        assert await h.fire_due() == 0
        assert await h.advance(timedelta(minutes=1)) == 1
        await h.advance(timedelta(days=2))
        sent = templates(await h.requests(until=lambda m: len(m) >= 6))
        assert sent == [
            ("la", "offer"),
            ("la", "tips"),
            ("la", "welcome"),
            ("tokyo", "offer"),
            ("tokyo", "tips"),
            ("tokyo", "welcome"),
        ]
        assert {r.status for r in await h.instances(jid)} == {"exited"}


async def test_goal_exits_as_converted_before_the_next_message(make_settings: Any) -> None:
    journey = linear(
        "Trial nudge",
        "Trial Started",
        [
            {"id": "wait_a_day", "type": "delay", "duration": "P1D"},
            {"id": "nudge", "type": "send", "channel": "email", "template_id": "nudge"},
        ],
        goal={"event": "Subscribed", "within": "P7D"},
    )
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        await h.track("a", "Trial Started")
        await h.track("b", "Trial Started")
        await h.advance(timedelta(hours=3))
        await h.track("a", "Subscribed")
        await h.advance(timedelta(days=1))
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["a"].status == "converted" and rows["a"].exit_reason == "goal: Subscribed"
        assert rows["b"].status == "exited"
        assert [m["customer_id"] for m in await h.requests(until=lambda m: len(m) >= 1)] == ["b"]
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        nodes = {n["node_id"]: n for n in stats["versions"][0]["nodes"]}
        assert nodes["wait_a_day"]["converted"] == 1 and nodes["nudge"]["passed"] == 1


async def test_frequency_cap_and_quiet_hours_across_two_journeys(make_settings: Any) -> None:
    async with engine_running(
        make_settings,
        frequency_caps={"email": {"limit": 1, "period": "day"}},
        quiet_hours_start=time(21, 0),
        quiet_hours_end=time(8, 0),
    ) as h:
        await h.profile("c1", {"email": "c1@example.com", "timezone": "Europe/Berlin"})
        first = await h.journey(
            linear(
                "Promo A",
                "Visited",
                [{"id": "promo", "type": "send", "channel": "email", "template_id": "promo-a"}],
                reentry=ALWAYS,
            )
        )
        second = await h.journey(
            linear(
                "Promo B",
                "Visited",
                [
                    {"id": "wait", "type": "delay", "duration": "PT2H"},
                    {"id": "promo", "type": "send", "channel": "email", "template_id": "promo-b"},
                ],
                reentry=ALWAYS,
            )
        )
        receipts = await h.journey(
            linear(
                "Receipt",
                "Visited",
                [{"id": "receipt", "type": "send", "channel": "email", "template_id": "receipt"}],
                category="transactional",
                reentry=ALWAYS,
            )
        )
        await h.track("c1", "Visited")  # 10:00 Berlin: promo A and the receipt go out
        await h.advance(timedelta(hours=2))  # promo B: capped (one marketing email per Berlin day)
        statuses = await h.statuses(idle=0.5)
        [capped] = [s for s in statuses if s["status"] == "capped"]
        assert capped["journey_id"] == second and "frequency cap" in capped["reason"]
        logged = await h.rows("SELECT journey_id, decision, reason FROM message_log ORDER BY journey_id")
        assert {(r.journey_id, r.decision) for r in logged} == {
            (first, "requested"),
            (second, "capped"),
            (receipts, "requested"),
        }

        # Next day 23:00 Berlin (22:00 UTC) is quiet: held until 08:00 Berlin, then sent.
        h.clock.set(datetime(2026, 1, 6, 22, 0, tzinfo=UTC))
        await h.track("c1", "Visited")
        sent_now = sorted(m["template_id"] for m in await h.requests(until=lambda m: len(m) >= 3))
        assert sent_now == ["promo-a", "receipt", "receipt"]  # the receipt ignores quiet hours
        held = await h.rows(
            "SELECT journey_id, wait FROM instances WHERE status = 'active' AND node_id = 'promo'"
        )
        assert [(r.journey_id, r.wait) for r in held] == [(first, {"kind": "quiet_hours"})]
        # 06:59 UTC: promo B's delay is over at 01:00 Berlin, so it is held too.
        assert await h.advance(timedelta(hours=8, minutes=59)) == 1
        held = await h.rows(
            "SELECT journey_id FROM instances WHERE status = 'active' AND wait->>'kind' = 'quiet_hours'"
        )
        assert sorted(r.journey_id for r in held) == sorted([first, second])
        # 08:00 Berlin: the window ends; one promo goes out, the other hits the daily cap.
        assert await h.advance(timedelta(minutes=1)) == 2
        requests = await h.requests(until=lambda m: len(m) >= 4)
        promos = [m for m in requests if m["template_id"].startswith("promo")]
        assert len(promos) == 2 and promos[-1]["requested_at"].startswith("2026-01-07T07:00")
        decisions = await h.rows("SELECT decision FROM message_log WHERE decided_at >= '2026-01-07T07:00Z'")
        assert sorted(r.decision for r in decisions) == ["capped", "requested"]


async def test_a_walk_that_fails_leaves_no_trace_in_the_customers_other_journeys(make_settings: Any) -> None:
    """'a-loop' loops through a delay whose date has passed (it passes at once) until the walk's step
    limit: its trait change and its send must not be seen by 'b-check', walked next in the same batch."""
    looping = {
        "name": "Loop",
        "entry": {"type": "event", "event": "Visited"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "tag", "type": "update_trait", "traits": {"looped": True}},
            {"id": "mail", "type": "send", "channel": "email", "template_id": "loop"},
            {"id": "renewal", "type": "delay", "until_trait": "renewal_date"},
        ],
        "edges": [
            {"from": "start", "to": "tag"},
            {"from": "tag", "to": "mail"},
            {"from": "mail", "to": "renewal"},
            {"from": "renewal", "to": "tag"},
        ],
    }
    checking = {
        "name": "Check",
        "entry": {"type": "event", "event": "Visited"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {
                "id": "seen",
                "type": "condition",
                "branches": [{"name": "leaked", "where": [{"field": "traits.looped", "op": "exists"}]}],
            },
            {"id": "leaked_mail", "type": "send", "channel": "email", "template_id": "leaked"},
            {"id": "clean_mail", "type": "send", "channel": "email", "template_id": "clean"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "seen"},
            {"from": "seen", "to": "leaked_mail", "branch": "leaked"},
            {"from": "seen", "to": "clean_mail", "branch": "else"},
            {"from": "leaked_mail", "to": "done"},
            {"from": "clean_mail", "to": "done"},
        ],
    }
    async with engine_running(make_settings, frequency_caps={"email": {"limit": 1, "period": "day"}}) as h:
        await h.profile("c1", {"email": "c1@example.com", "renewal_date": "2020-01-01"})
        loop = await h.journey(looping, journey_id="a-loop")
        check = await h.journey(checking, journey_id="b-check")
        await h.track("c1", "Visited")
        [failed] = await h.instances(loop)
        assert failed.status == "exited" and "did not stop" in failed.exit_reason
        [finished] = await h.instances(check)
        assert finished.status == "exited" and finished.exit_reason == "completed"
        [sent] = await h.requests(until=lambda m: len(m) >= 1)
        assert sent["template_id"] == "clean"  # not 'leaked', and not capped by the failed walk's sends
        assert await h.scalar("SELECT count(*) FROM message_log WHERE decision = 'capped'") == 0
