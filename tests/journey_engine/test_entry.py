"""Entry: segment enter/exit, lifecycle stage, scheduled broadcasts, re-entry policies, caps, A/B splits;
entries in flight when a journey is paused or archived."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from services.journey_engine.api import journeys as journeys_api
from services.journey_engine.store.journeys import ENTRY_GATE
from shared.contracts.events import RESYNC_CAUSE, CustomerEvent
from shared.contracts.topics import CUSTOMER_EVENTS
from shared.observability.metrics import HANDLER_ERRORS
from tests.journey_engine.harness import ADMIN, Harness, engine_running
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import eventually

SEND_AND_WAIT = [
    {"id": "hello", "type": "send", "channel": "email", "template_id": "hello"},
    {"id": "wait", "type": "delay", "duration": "P3D"},
]


def segment_journey(**entry: Any) -> dict[str, Any]:
    j = linear("Segment", "unused", SEND_AND_WAIT, exit_when_entry_false=True)
    j["entry"] = {"type": "segment", "segment_id": "high-value"} | entry
    return j


async def test_segment_entry_trigger_exit_on_leave_and_current_members(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.membership("early", "high-value")  # a member before the journey exists
        future_only = await h.journey(segment_journey())
        with_current = await h.journey(segment_journey(enrol_current=True))
        await h.fire_due()  # enrolment of current members runs on the timer loop
        await h.membership("c1", "high-value")
        await h.membership("c2", "other-segment")
        assert [(r.customer_id, r.status) for r in await h.instances(future_only)] == [("c1", "active")]
        assert [(r.customer_id, r.status) for r in await h.instances(with_current)] == [
            ("c1", "active"),
            ("early", "active"),
        ]
        await h.membership("c1", "high-value", "exited")
        rows = {r.customer_id: r for r in await h.instances(future_only)}
        assert rows["c1"].status == "exited" and rows["c1"].exit_reason == "entry condition no longer holds"
        assert sorted(m["customer_id"] for m in await h.requests(until=lambda m: len(m) >= 3)) == [
            "c1",
            "c1",
            "early",
        ]


async def test_a_resynced_membership_is_state_not_an_entry(make_settings: Any) -> None:
    """Memberships re-announced for a rebuilt projection (cause `resync`) start and end no journey,
    yet the projection follows them (a `member` condition sees them)."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(segment_journey())
        await h.membership("r1", "high-value", cause=RESYNC_CAUSE)
        assert await h.instances(jid) == []
        members = (
            "SELECT count(*) FROM segment_members WHERE segment_id = 'high-value' AND customer_id = 'r1'"
        )
        assert await h.scalar(members) == 1
        await h.membership("r2", "high-value")  # a real entry still starts one
        await h.membership("r2", "high-value", "exited", cause=RESYNC_CAUSE)  # and a resync ends none
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("r2", "active")]


async def test_lifecycle_stage_trigger(make_settings: Any) -> None:
    journey = linear("Win back", "unused", SEND_AND_WAIT)
    journey["entry"] = {"type": "lifecycle_stage", "to_stage": "at_risk", "from_stage": "active"}
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        await h.profile(
            "c1", {"email": "c1@example.com"}, kind="stage_changed", stage="at_risk", previous="active"
        )
        await h.profile("c2", {}, kind="stage_changed", stage="at_risk", previous="new")
        await h.profile("c3", {}, kind="traits_changed")
        assert [r.customer_id for r in await h.instances(jid)] == ["c1"]
        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["recipient"]["email"] == "c1@example.com"


async def test_scheduled_broadcast_in_each_customers_local_time(make_settings: Any) -> None:
    journey = linear(
        "Newsletter",
        "unused",
        [{"id": "news", "type": "send", "channel": "email", "template_id": "news"}],
        reentry={"policy": "always"},
    )
    journey["entry"] = {
        "type": "schedule",
        "segment_id": "subscribers",
        "at": "2026-01-06T00:00:00Z",
        "every": "P7D",
        "local_time": "09:00",
    }
    async with engine_running(make_settings) as h:
        await h.profile("paris", {"timezone": "Europe/Paris"})
        await h.profile("ny", {"timezone": "America/New_York"})
        for c in ("paris", "ny"):
            await h.membership(c, "subscribers")
        jid = await h.journey(journey)
        h.clock.set(datetime(2026, 1, 6, 0, 0, tzinfo=UTC))
        await h.fire_due()
        assert len(await h.instances(jid)) == 2  # enrolled, each waiting for 09:00 local
        h.clock.set(datetime(2026, 1, 6, 8, 0, tzinfo=UTC))  # 09:00 Paris
        assert await h.fire_due() == 1
        h.clock.set(datetime(2026, 1, 6, 14, 0, tzinfo=UTC))  # 09:00 New York
        assert await h.fire_due() == 1
        msgs = await h.requests(until=lambda m: len(m) >= 2)
        assert [(m["customer_id"], m["requested_at"][:16]) for m in msgs] in (
            [("paris", "2026-01-06T08:00"), ("ny", "2026-01-06T14:00")],
        )
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["next_run_at"].startswith("2026-01-13T00:00")


async def test_reentry_policies_and_entry_cap(make_settings: Any) -> None:
    quick = [{"id": "hi", "type": "send", "channel": "sms", "template_id": "hi"}]
    async with engine_running(make_settings) as h:
        once = await h.journey(linear("Once", "Ping", quick))
        after = await h.journey(linear("After", "Ping", quick, reentry={"policy": "after", "days": 2}))
        always = await h.journey(linear("Always", "Ping", quick, reentry={"policy": "always"}))
        capped = await h.journey(linear("Capped", "Ping", quick, reentry={"policy": "always"}, entry_cap=2))
        await h.track("c1", "Ping")
        await h.advance(timedelta(days=1))
        await h.track("c1", "Ping")
        await h.advance(timedelta(days=1, hours=1))
        await h.track("c1", "Ping")
        counts = {j: len(await h.instances(j)) for j in (once, after, always, capped)}
        assert counts == {once: 1, after: 2, always: 3, capped: 2}


async def test_entered_counts_without_a_cap_and_a_cap_added_later_counts_earlier_entries(
    make_settings: Any,
) -> None:
    """Entries were counted on the journey only while it had a cap: an uncapped journey showed
    `entered` 0, and a cap of 3 added after 3 entries let 2 more in. The cap counts every entry of
    the journey's life (all versions)."""
    async with engine_running(make_settings) as h:
        d = linear("Launch", "Signed Up", SEND_AND_WAIT)
        jid = await h.journey(d)
        for c in ("c1", "c2", "c3"):
            await h.track(c, "Signed Up")
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["entered"] == 3
        listed = (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"]
        assert [j["entered"] for j in listed if j["id"] == jid] == [3]
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": d | {"entry_cap": 3}}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        assert r.json()["entered"] == 3
        for c in ("c4", "c5"):
            await h.track(c, "Signed Up")
        assert sorted(i.customer_id for i in await h.instances(jid)) == ["c1", "c2", "c3"]
        # Raised to 4: one more, counted on the row from the cap on.
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": d | {"entry_cap": 4}}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        for c in ("c6", "c7"):
            await h.track(c, "Signed Up")
        assert sorted(i.customer_id for i in await h.instances(jid)) == ["c1", "c2", "c3", "c6"]
        assert (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()["entered"] == 4


async def test_a_cap_added_to_a_live_journey_waits_for_the_entries_in_flight(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Setting a cap counts the entries made without one, so it waits for the batches entering
    customers now, as a pause does: held up past `STATUS_LOCK_TIMEOUT_MS` it answers 503
    journey_busy and saves nothing. An edit that sets no new cap takes no gate."""
    monkeypatch.setattr(journeys_api, "STATUS_LOCK_TIMEOUT_MS", 300)
    async with engine_running(make_settings) as h:
        d = linear("Launch", "Signed Up", SEND_AND_WAIT)
        jid = await h.journey(d)
        async with entry_in_flight(h):
            r = await asyncio.wait_for(
                h.client.put(f"/v1/journeys/{jid}", json={"definition": d | {"entry_cap": 3}}, headers=ADMIN),
                10,
            )
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"] == "journey_busy"
            r = await asyncio.wait_for(
                h.client.put(
                    f"/v1/journeys/{jid}", json={"definition": d | {"name": "Renamed"}}, headers=ADMIN
                ),
                10,
            )
            assert r.status_code == 200, r.text
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["version"] == 2 and body["definition"].get("entry_cap") is None


async def test_two_entries_of_a_customer_in_one_batch(make_settings: Any) -> None:
    """Re-entry `always`, and the same customer enters twice within one consumer batch: both
    instances start, the enrolment counts two, and the batch does not fail (it did, once, as ON
    CONFLICT met the same enrolment twice, and was retried by halves)."""
    quick = [{"id": "hi", "type": "send", "channel": "sms", "template_id": "hi"}]
    async with engine_running(make_settings) as h:
        always = await h.journey(linear("Always", "Ping", quick, reentry={"policy": "always"}))
        runner = h.platform.consumers[0]
        failed_before = HANDLER_ERRORS.labels(h.settings.service_name, runner.topic)._value.get()
        for _ in range(4):
            await h.track("c1", "Ping", wait=False)
        await h.processed("events")
        assert len(await h.instances(always)) == 4
        entries = "SELECT entries FROM enrolments WHERE journey_id = :j AND customer_id = 'c1'"
        assert await h.scalar(entries, j=always) == 4
        assert HANDLER_ERRORS.labels(h.settings.service_name, runner.topic)._value.get() == failed_before


async def test_ab_split_proportions_and_significance(make_settings: Any) -> None:
    journey = {
        "name": "A/B",
        "entry": {"type": "event", "event": "Joined"},
        "goal": {"event": "Purchased"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {
                "id": "ab",
                "type": "split",
                "arms": [
                    {"name": "a", "percent": 50},
                    {"name": "b", "percent": 30},
                    {"name": "holdout", "percent": 20, "holdout": True},
                ],
            },
            {"id": "mail_a", "type": "send", "channel": "email", "template_id": "a"},
            {"id": "mail_b", "type": "send", "channel": "email", "template_id": "b"},
            {"id": "wait", "type": "delay", "duration": "P7D"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "ab"},
            {"from": "ab", "to": "mail_a", "branch": "a"},
            {"from": "ab", "to": "mail_b", "branch": "b"},
            {"from": "ab", "to": "wait", "branch": "holdout"},
            {"from": "mail_a", "to": "wait"},
            {"from": "mail_b", "to": "wait"},
            {"from": "wait", "to": "done"},
        ],
    }
    n = 1000
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        now = h.clock.now()

        def event(user: str, name: str) -> CustomerEvent:
            return CustomerEvent(
                message_id=uuid.uuid4().hex,
                type="track",
                user_id=user,
                event=name,
                timestamp=now,
                received_at=now,
            )

        await asyncio.gather(
            *(
                h.platform.producer.publish(CUSTOMER_EVENTS.name, f"u{i}", event(f"u{i}", "Joined"))
                for i in range(n)
            )
        )
        h.published["events"] += n
        await h.processed("events")
        arms = {
            r.arm: r.n
            for r in await h.rows(
                "SELECT context->'arms'->>'ab' AS arm, count(*) AS n FROM instances GROUP BY 1"
            )
        }
        assert sum(arms.values()) == n
        for arm, share in (("a", 0.5), ("b", 0.3), ("holdout", 0.2)):
            assert abs(arms[arm] / n - share) < 0.05, arms
        # Everyone in arm a buys, nobody else: a is significantly better than the holdout, b is not.
        buyers = [
            r.customer_id
            for r in await h.rows("SELECT customer_id FROM instances WHERE context->'arms'->>'ab' = 'a'")
        ]
        await asyncio.gather(
            *(h.platform.producer.publish(CUSTOMER_EVENTS.name, c, event(c, "Purchased")) for c in buyers)
        )
        h.published["events"] += len(buyers)
        await h.processed("events")
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        [split] = stats["splits"]
        by_arm = {a["arm"]: a for a in split["arms"]}
        assert by_arm["a"]["conversion_rate"] == 1.0 and by_arm["a"]["vs_holdout"]["significant_at_0_05"]
        assert by_arm["b"]["conversion_rate"] == 0.0 and by_arm["b"]["vs_holdout"] is None
        assert by_arm["holdout"]["customers"] == arms["holdout"]


async def test_events_resolve_to_canonical_customer_and_wait_for_segment(make_settings: Any) -> None:
    journey = {
        "name": "Upgrade",
        "entry": {"type": "event", "event": "Pricing Viewed"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "wait_vip", "type": "wait_segment", "segment_id": "vip", "timeout": "P1D"},
            {"id": "thanks", "type": "send", "channel": "email", "template_id": "welcome-vip"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "wait_vip"},
            {"from": "wait_vip", "to": "thanks", "branch": "matched"},
            {"from": "wait_vip", "to": "done", "branch": "timeout"},
            {"from": "thanks", "to": "done"},
        ],
    }
    async with engine_running(make_settings) as h:
        await h.profile(
            "cust-1", {"email": "one@example.com"}, identities={"user_id": ["u-9"], "anonymous_id": ["a-9"]}
        )
        jid = await h.journey(journey)
        await h.track("u-9", "Pricing Viewed")
        await h.track("stranger", "Pricing Viewed")
        assert {r.customer_id for r in await h.instances(jid)} == {"cust-1", "stranger"}
        await h.membership("cust-1", "vip")
        await h.advance(timedelta(days=1))
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["cust-1"].status == "exited" and rows["stranger"].status == "exited"
        [sent] = await h.requests(until=lambda m: len(m) >= 1)
        assert sent["customer_id"] == "cust-1" and sent["recipient"]["email"] == "one@example.com"


async def test_a_late_announcement_about_a_merged_away_profile_takes_nothing_back(make_settings: Any) -> None:
    """`dev-1` browsed as its own profile, then was merged into `u-5`. An announcement about `dev-1`
    from before the merge, arriving after it (another key, so another partition), leaves `dev-1`'s
    events on `u-5`."""
    async with engine_running(make_settings) as h:
        before = h.clock.now()
        h.clock.advance(timedelta(minutes=5))
        await h.profile(
            "u-5",
            {"email": "five@example.com"},
            kind="identity_merged",
            identities={"user_id": ["u-5"], "anonymous_id": ["dev-1"]},
            merged_ids=["dev-1"],
        )
        await h.profile("dev-1", {}, identities={"anonymous_id": ["dev-1"]}, occurred_at=before)
        jid = await h.journey(
            linear("Ping", "Ping", [{"id": "hi", "type": "send", "channel": "sms", "template_id": "hi"}])
        )
        await h.track("dev-1", "Ping")
        assert [r.customer_id for r in await h.instances(jid)] == ["u-5"]


async def test_entry_filters_and_goals_see_the_customers_timezone_locale_and_contact(
    make_settings: Any,
) -> None:
    """`customer.*` facts mean the same in entry filters and goals as in conditions."""
    journey = linear(
        "Paris",
        "Viewed",
        [{"id": "wait", "type": "delay", "duration": "P1D"}],
        goal={"event": "Bought", "where": [{"field": "customer.locale", "op": "eq", "value": "fr-FR"}]},
    )
    journey["entry"]["where"] = [
        {"field": "customer.timezone", "op": "eq", "value": "Europe/Paris"},
        {"field": "customer.email", "op": "exists"},
    ]
    async with engine_running(make_settings) as h:
        await h.profile("paris", {"timezone": "Europe/Paris", "locale": "fr-FR", "email": "p@example.com"})
        await h.profile("ny", {"timezone": "America/New_York", "email": "n@example.com"})
        await h.profile("no-email", {"timezone": "Europe/Paris"})
        jid = await h.journey(journey)
        for c in ("paris", "ny", "no-email"):
            await h.track(c, "Viewed")
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("paris", "active")]
        await h.track("paris", "Bought")
        [row] = await h.instances(jid)
        assert row.status == "converted" and row.exit_reason == "goal: Bought"


async def gate_waiters(h: Harness) -> int:
    """Transactions waiting for this schema's entry gate."""
    return int(
        await h.scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 2 "
            "AND (classid, objid) = (SELECT CAST(a AS oid), CAST(b AS oid) "
            f"FROM (SELECT {ENTRY_GATE}) AS g(a, b))"
        )
    )


def status_change_mid_batch(
    h: Harness, monkeypatch: pytest.MonkeyPatch, journey_id: str, action: str
) -> list[asyncio.Task[httpx.Response]]:
    """Pause or archive the journey while the next consumer batch that reads it as active is between
    that read and its entries (the task of the request, once sent); the batch goes on only once the
    request waits for it."""
    original = h.engine.active_journeys
    sent: list[asyncio.Task[httpx.Response]] = []

    async def racing(session: Any, rows: list[Any]) -> Any:
        out = await original(session, rows)
        if not sent and any(r.id == journey_id for r in rows):
            sent.append(
                asyncio.create_task(h.client.post(f"/v1/journeys/{journey_id}/{action}", headers=ADMIN))
            )
            await eventually(lambda: gate_waiters(h))
        return out

    monkeypatch.setattr(h.engine, "active_journeys", racing)
    return sent


async def test_archiving_while_an_entry_is_in_flight_exits_it_with_the_rest(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch had read the journey as active when the archive committed (nothing to exit for its
    customer yet), then entered them: a live instance of an archived journey, which kept sending.
    The archive now waits for entries in flight and exits them too; later batches see it archived."""
    drip = [
        {"id": "wait", "type": "delay", "duration": "PT1H"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "drip"},
    ]
    async with engine_running(make_settings) as h:
        jid = await h.journey(linear("Drip", "Signed Up", drip))
        sent = status_change_mid_batch(h, monkeypatch, jid, "archive")
        await h.track("a", "Signed Up")
        [archive] = sent
        r = await archive
        assert r.status_code == 200 and r.json()["status"] == "archived", r.text
        [row] = await h.instances(jid)
        assert (row.customer_id, row.status, row.node_id, row.exit_reason) == (
            "a",
            "exited",
            "wait",
            "archived",
        )
        await h.track("b", "Signed Up")
        assert [r.customer_id for r in await h.instances(jid)] == ["a"]
        await h.advance(timedelta(hours=1))
        assert await h.requests(idle=0.5) == []


async def test_pausing_while_an_entry_is_in_flight_lets_it_finish_then_takes_no_more(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause answers once the entries that read the journey as active have committed: they stand
    (customers inside keep moving), and none come after it."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(linear("Hello", "Signed Up", SEND_AND_WAIT))
        sent = status_change_mid_batch(h, monkeypatch, jid, "pause")
        await h.track("a", "Signed Up")
        [pause] = sent
        r = await pause
        assert r.status_code == 200 and r.json()["status"] == "paused", r.text
        await h.track("b", "Signed Up")
        assert [(r.customer_id, r.status, r.node_id) for r in await h.instances(jid)] == [
            ("a", "active", "wait")
        ]
        assert [(m["customer_id"], m["template_id"]) for m in await h.requests(idle=0.5)] == [("a", "hello")]
        await h.advance(timedelta(days=3))
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("a", "exited")]


@contextlib.asynccontextmanager
async def entry_in_flight(h: Harness) -> AsyncIterator[None]:
    """The entry gate held shared for the block, as a consumer batch that may enter customers holds
    it (a slow one: stuck on a lock, or a large batch)."""
    async with h.platform.engine.connect() as holder:
        await holder.execute(text(f"SELECT pg_advisory_xact_lock_shared({ENTRY_GATE})"))
        try:
            yield
        finally:
            await holder.rollback()


async def test_a_pause_that_cannot_have_the_gate_soon_answers_busy_and_holds_up_no_entry_for_long(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slow batch in flight: the pause waited for it without a bound, and every entry into any
    journey queued behind the pause meanwhile. It gives up after `STATUS_LOCK_TIMEOUT_MS` (503
    journey_busy, Retry-After), changing nothing; the entries queued behind it go on."""
    monkeypatch.setattr(journeys_api, "STATUS_LOCK_TIMEOUT_MS", 300)
    async with engine_running(make_settings) as h:
        paused = await h.journey(linear("Hello", "Signed Up", SEND_AND_WAIT))
        other = await h.journey(linear("Other", "Bought", SEND_AND_WAIT))
        async with entry_in_flight(h):
            pause = asyncio.create_task(h.client.post(f"/v1/journeys/{paused}/pause", headers=ADMIN))
            await eventually(lambda: gate_waiters(h))
            await h.track("b", "Bought", wait=False)  # queued behind the pause's request
            r = await asyncio.wait_for(pause, 10)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"] == "journey_busy"
            await h.processed("events")  # entered, the batch in flight still holding the gate
            assert [(i.customer_id, i.status) for i in await h.instances(other)] == [("b", "active")]
        body = (await h.client.get(f"/v1/journeys/{paused}", headers=ADMIN)).json()
        assert body["status"] == "active"
        assert (await h.client.post(f"/v1/journeys/{paused}/pause", headers=ADMIN)).status_code == 200


async def test_a_refused_status_change_takes_no_gate(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown journey (404) or a transition its status does not allow (409) waited for the gate
    all the same, holding up every entry meanwhile: refused before it now, at once."""
    monkeypatch.setattr(journeys_api, "STATUS_LOCK_TIMEOUT_MS", 60_000)
    async with engine_running(make_settings) as h:
        jid = await h.journey(linear("Hello", "Signed Up", SEND_AND_WAIT))
        assert (await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)).status_code == 200
        async with entry_in_flight(h):
            for path, status in ((f"{jid}/pause", 409), ("nobody/archive", 404)):
                r = await asyncio.wait_for(h.client.post(f"/v1/journeys/{path}", headers=ADMIN), 10)
                assert r.status_code == status, r.text
            assert await gate_waiters(h) == 0
