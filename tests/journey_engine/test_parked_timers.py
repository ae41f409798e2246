"""The parked timers API: a journey's timers whose step kept failing are listed (paged), put back
(once, due now, no tries counted) or discarded (the customer exits and may enter again), one at a
time or all at once (of one node); bad input is a 4xx naming the field and changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from services.journey_engine.execution import engine as engine_module
from services.journey_engine.store import privacy as privacy_store
from shared.contracts.events import PrivacyAction
from tests.journey_engine.harness import ADMIN, Harness, engine_running
from tests.journey_engine.test_privacy import ask
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import eventually

DELAYED = linear(
    "Delayed",
    "Signed Up",
    [
        {"id": "wait", "type": "delay", "duration": "PT1H"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "later"},
    ],
    reentry={"policy": "always"},
)
# Two waits: customers parked at either.
TWO_WAITS = linear(
    "Two waits",
    "Signed Up",
    [
        {"id": "first", "type": "delay", "duration": "PT1H"},
        {"id": "second", "type": "delay", "duration": "PT1H"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "later"},
    ],
)


# A timeout armed at a wait: the awaited event moves the customer on, and leaves the timer stale.
WAIT_CLICK = {
    "name": "Nudge",
    "entry": {"type": "event", "event": "Viewed"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {"id": "seen", "type": "wait_event", "event": "Clicked", "timeout": "PT1H"},
        {"id": "thanks", "type": "send", "channel": "email", "template_id": "thanks"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "seen"},
        {"from": "seen", "to": "thanks", "branch": "matched"},
        {"from": "seen", "to": "done", "branch": "timeout"},
        {"from": "thanks", "to": "done"},
    ],
}


def break_steps(h: Harness, monkeypatch: pytest.MonkeyPatch, when: Any) -> None:
    """Steps of the instances `when(row)` picks fail for a reason of their own (as a bug would)."""
    react = h.engine._react

    async def broken(uow: Any, writer: Any, row: Any, *args: Any) -> bool:
        if when(row):
            raise RuntimeError(f"{row.customer_id}'s step fails at {row.node_id}")
        return await react(uow, writer, row, *args)

    monkeypatch.setattr(h.engine, "_react", broken)


async def enter(h: Harness, customers: list[str]) -> None:
    for c in customers:
        await h.track(c, "Signed Up", wait=False)
    await h.processed("events")


async def parked_list(h: Harness, journey_id: str, **params: Any) -> dict[str, Any]:
    r = await h.client.get(f"/v1/journeys/{journey_id}/parked-timers", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def blocked_by(h: Harness, session_or_conn: Any) -> int:
    """How many database sessions wait for a lock this one (a session or a connection) holds."""
    pid = (await session_or_conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    n: int = await h.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE CAST(:pid AS int) = ANY(pg_blocking_pids(pid))", pid=pid
    )
    return n


async def stats(h: Harness, journey_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await h.client.get(f"/v1/journeys/{journey_id}/stats", headers=ADMIN)).json()
    return body


def wait_longer_for_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests whose requests queue behind another transaction on purpose: their 1 s lock wait
    (503 past it) is not what they check, and a loaded CI host can take longer to release it."""
    monkeypatch.setattr(engine_module, "PARKED_LOCK_TIMEOUT_MS", 60_000)


async def test_parked_timers_are_listed_and_one_put_back_runs_once(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings) as h:
        jid = await h.journey(DELAYED)
        customers = [f"c{i}" for i in range(5)]
        await enter(h, customers)
        break_steps(h, monkeypatch, lambda row: True)
        retry_s = h.settings.timer_retry_s
        assert await h.advance(timedelta(hours=1)) == 5  # tried, then 60 s and 120 s later: parked
        assert await h.advance(timedelta(seconds=retry_s)) == 5
        assert await h.advance(timedelta(seconds=2 * retry_s)) == 5
        parked_at = h.clock.now()
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        instances = {r.customer_id: r.id for r in await h.rows("SELECT customer_id, id FROM instances")}

        # Listed a page at a time (all parked in the same instant: the cursor's id breaks the tie).
        seen: list[dict[str, Any]] = []
        body = await parked_list(h, jid, limit=2)
        pages = 1
        while True:
            assert len(body["parked_timers"]) <= 2
            seen += body["parked_timers"]
            if body["next_after"] is None:
                break
            body = await parked_list(h, jid, limit=2, after=body["next_after"])
            pages += 1
        assert pages == 3
        assert sorted(t["customer_id"] for t in seen) == customers
        assert len({t["id"] for t in seen}) == 5
        for t in seen:
            assert t["instance_id"] == instances[t["customer_id"]]
            assert (t["node_id"], t["version"], t["instance_status"], t["holds_instance"]) == (
                "wait",
                1,
                "active",
                True,
            )
            assert datetime.fromisoformat(t["due_at"]) == parked_at  # its last try's
            assert datetime.fromisoformat(t["parked_at"]) == parked_at
            assert t["attempts"] == h.settings.timer_max_attempts
            assert t["error"] == f"RuntimeError: {t['customer_id']}'s step fails at wait"
        assert (await parked_list(h, jid, node_id="wait"))["parked_timers"] == sorted(
            seen, key=lambda t: (t["parked_at"], t["id"])
        )
        assert (await parked_list(h, jid, node_id="mail"))["parked_timers"] == []
        assert (await stats(h, jid))["timers_parked"] == 5
        by_customer = {t["customer_id"]: t["id"] for t in seen}

        # Fixed: c0's timer goes back, under its id, due now with no tries counted; the next pass
        # fires it, once.
        monkeypatch.undo()
        c0 = by_customer["c0"]
        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{c0}/requeue", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["customer_id"], r.json()["attempts"]) == (c0, "c0", 0)
        assert datetime.fromisoformat(r.json()["due_at"]) == h.clock.now()
        assert [tuple(t) for t in await h.rows("SELECT id, attempts, due_at FROM timers")] == [
            (c0, 0, h.clock.now())
        ]
        # Asked again (a retried request): refused, no second timer.
        for action in ("requeue", "discard"):
            r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{c0}/{action}", headers=ADMIN)
            assert r.status_code == 409 and r.json()["error"] == "already_requeued", r.text
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("timer_id", "parked")]
        assert await h.scalar("SELECT count(*) FROM timers") == 1
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 4
        assert (await stats(h, jid))["timers_parked"] == 4

        assert await h.engine.run_once() == 1
        assert await h.fire_due() == 0
        status = {r.customer_id: (r.status, r.node_id) for r in await h.instances(jid)}
        assert status["c0"] == ("exited", "done")
        assert {status[c] for c in customers[1:]} == {("active", "wait")}
        requests = await h.requests()
        assert [(m["customer_id"], m["template_id"]) for m in requests] == [("c0", "later")]
        assert await h.scalar("SELECT count(*) FROM message_log") == 1
        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{c0}/requeue", headers=ADMIN)
        assert r.status_code == 404 and r.json()["errors"][0]["field"] == "timer_id", r.text

        # Put back while the step still fails: its tries start again from none (retried 60 s later,
        # not parked at once).
        break_steps(h, monkeypatch, lambda row: True)
        c1 = by_customer["c1"]
        assert (
            await h.client.post(f"/v1/journeys/{jid}/parked-timers/{c1}/requeue", headers=ADMIN)
        ).status_code == 200
        assert await h.engine.run_once() == 1
        assert [tuple(t) for t in await h.rows("SELECT id, attempts, due_at FROM timers")] == [
            (c1, 1, h.clock.now() + timedelta(seconds=retry_s))
        ]
        # The audit log has the operator's actions.
        audited = await h.scalar(
            "SELECT count(*) FROM audit_log WHERE method = 'POST' AND path LIKE '%/parked-timers/%/requeue'"
        )
        assert audited == 2


async def test_concurrent_requeues_of_one_timer_put_it_back_once(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        await enter(h, ["c0"])
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        [timer] = (await parked_list(h, jid))["parked_timers"]
        url = f"/v1/journeys/{jid}/parked-timers/{timer['id']}/requeue"
        answers = await asyncio.gather(*(h.client.post(url, headers=ADMIN) for _ in range(4)))
        assert sorted(r.status_code for r in answers) == [200, 409, 409, 409]
        assert await h.scalar("SELECT count(*) FROM timers") == 1
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0


async def test_a_discarded_parked_timer_exits_its_customer_who_may_enter_again(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED | {"correlation_key": "plan"})
        await h.track("c0", "Signed Up", {"plan": "gold"})
        await h.track("c1", "Signed Up", {"plan": "gold"})
        break_steps(h, monkeypatch, lambda row: True)
        assert await h.advance(timedelta(hours=1)) == 2
        monkeypatch.undo()
        timers = {t["customer_id"]: t for t in (await parked_list(h, jid))["parked_timers"]}
        # Held at its step, c0 does not enter again for that value.
        await h.track("c0", "Signed Up", {"plan": "gold"})
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [
            ("c0", "active"),
            ("c1", "active"),
        ]
        exited_before = {n["node_id"]: n["exited"] for n in (await stats(h, jid))["versions"][0]["nodes"]}[
            "wait"
        ]

        r = await h.client.post(
            f"/v1/journeys/{jid}/parked-timers/{timers['c0']['id']}/discard", headers=ADMIN
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["customer_id"], body["node_id"], body["instance_exited"], body["exit_reason"]) == (
            "c0",
            "wait",
            True,
            "timer_discarded",
        )
        assert body["instance_status"] == "exited"
        assert [tuple(r) for r in await h.instances(jid)] == [
            ("c0", "exited", "wait", "timer_discarded", "gold", 1),
            ("c1", "active", "wait", None, "gold", 1),
        ]
        after = await stats(h, jid)
        assert {n["node_id"]: n["exited"] for n in after["versions"][0]["nodes"]}["wait"] == exited_before + 1
        assert after["timers_parked"] == 1
        assert (
            await h.client.post(
                f"/v1/journeys/{jid}/parked-timers/{timers['c0']['id']}/discard", headers=ADMIN
            )
        ).status_code == 404
        assert await h.scalar("SELECT count(*) FROM timers") == 0  # discarded, not put back

        # Free again, c0 enters again for that value, and goes through.
        await h.track("c0", "Signed Up", {"plan": "gold"})
        c0 = [(r.status, r.node_id) for r in await h.instances(jid) if r.customer_id == "c0"]
        assert c0 == [("exited", "wait"), ("active", "wait")]
        await h.advance(timedelta(hours=1))
        c0 = [(r.status, r.exit_reason) for r in await h.instances(jid) if r.customer_id == "c0"]
        assert c0 == [("exited", "timer_discarded"), ("exited", "completed")]
        requests = await h.requests()
        assert [m["customer_id"] for m in requests] == ["c0"]

        # A parked timer whose customer moved on since holds nobody: discarded, the customer stays.
        async with h.platform.engine.begin() as conn:
            await conn.execute(text("UPDATE instances SET seq = seq + 1 WHERE customer_id = 'c1'"))
        [stale] = (await parked_list(h, jid))["parked_timers"]
        assert (stale["customer_id"], stale["holds_instance"]) == ("c1", False)
        assert (await stats(h, jid))["timers_parked"] == 0
        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{stale['id']}/discard", headers=ADMIN)
        assert r.status_code == 200 and (r.json()["instance_exited"], r.json()["exit_reason"]) == (
            False,
            None,
        )
        assert [r.status for r in await h.instances(jid) if r.customer_id == "c1"] == ["active"]
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0


async def test_all_parked_timers_of_a_journey_or_of_one_node_at_once(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 2: the bulk requests go through several units of work. (Failures in two journeys at
    # once, nothing else due: counted at once, not taken for an outage.)
    async with engine_running(
        make_settings, timer_max_attempts=1, timer_batch_size=2, timer_outage_passes=1
    ) as h:
        jid = await h.journey(TWO_WAITS)
        other = await h.journey(DELAYED)  # its parked timer is none of the first journey's business
        a_side, b_side = ["a0", "a1", "a2"], ["b0", "b1", "b2"]
        await enter(h, a_side + b_side)

        def broken(row: Any) -> bool:
            if row.journey_id == other:
                return row.customer_id == "a0"
            return (row.customer_id[0], row.node_id) in (("a", "first"), ("b", "second"))

        break_steps(h, monkeypatch, broken)
        await h.advance(timedelta(hours=1))
        await h.advance(timedelta(hours=1))
        listed = (await parked_list(h, jid))["parked_timers"]
        assert sorted((t["customer_id"], t["node_id"]) for t in listed) == [
            ("a0", "first"),
            ("a1", "first"),
            ("a2", "first"),
            ("b0", "second"),
            ("b1", "second"),
            ("b2", "second"),
        ]
        assert len((await parked_list(h, other))["parked_timers"]) == 1

        # Those of one node, put back and fired once fixed.
        url = f"/v1/journeys/{jid}/parked-timers"
        r = await h.client.post(f"{url}/requeue", params={"node_id": "second"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["requeued"] == 3, r.text
        assert datetime.fromisoformat(r.json()["due_at"]) == h.clock.now()
        assert {t["node_id"] for t in (await parked_list(h, jid))["parked_timers"]} == {"first"}
        assert await h.scalar("SELECT count(*) FROM timers WHERE attempts = 0") == 3
        monkeypatch.undo()
        assert await h.fire_due() == 3
        status = {r.customer_id: (r.status, r.node_id) for r in await h.instances(jid)}
        assert {status[c] for c in b_side} == {("exited", "done")}
        assert {status[c] for c in a_side} == {("active", "first")}
        requests = [m for m in await h.requests() if m["journey_id"] == jid]
        assert sorted(m["customer_id"] for m in requests) == b_side

        # Again: nothing left there, nothing put back twice.
        r = await h.client.post(f"{url}/requeue", params={"node_id": "second"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["requeued"] == 0, r.text
        assert await h.scalar("SELECT count(*) FROM timers") == 0

        # The rest discarded (no node: all of the journey's): their customers exit and are counted.
        r = await h.client.post(f"{url}/discard", headers=ADMIN)
        assert r.status_code == 200 and (r.json()["discarded"], r.json()["exited"]) == (3, 3), r.text
        status = {r.customer_id: (r.status, r.exit_reason) for r in await h.instances(jid)}
        assert {status[c] for c in a_side} == {("exited", "timer_discarded")}
        assert (await stats(h, jid))["timers_parked"] == 0
        r = await h.client.post(f"{url}/discard", json={}, headers=ADMIN)  # an empty body is none
        assert r.status_code == 200 and (r.json()["discarded"], r.json()["exited"]) == (0, 0), r.text
        # The audit log tells a node's from all of them: the node is in the query, which it records.
        audited = await h.rows(
            "SELECT path, detail FROM audit_log WHERE path LIKE '%/parked-timers/%' ORDER BY id"
        )
        assert [(a.path.rsplit("/", 1)[1], a.detail) for a in audited] == [
            ("requeue", {"query": "node_id=second"}),
            ("requeue", {"query": "node_id=second"}),
            ("discard", {}),
            ("discard", {}),
        ]
        # The other journey's is still there.
        assert len((await parked_list(h, other))["parked_timers"]) == 1
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 1


async def test_bad_parked_timer_requests_are_refused_naming_the_field(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings, timer_max_attempts=1, timer_outage_passes=1) as h:
        jid = await h.journey(DELAYED)
        other = await h.journey(DELAYED | {"name": "Other"})
        await enter(h, ["c0"])  # enters both
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        [timer] = (await parked_list(h, jid))["parked_timers"]
        base = f"/v1/journeys/{jid}/parked-timers"

        assert (await h.client.get(base)).status_code == 401
        assert (await h.client.post(f"{base}/{timer['id']}/requeue")).status_code == 401
        assert (
            await h.client.post(f"{base}/requeue", headers={"Authorization": "Bearer no"})
        ).status_code == 401

        async def refused(
            method: str, url: str, status: int, field: str, rule: str | None, **kw: Any
        ) -> None:
            r = await h.client.request(method, url, headers=ADMIN, **kw)
            assert r.status_code == status, r.text
            body = r.json()
            assert "error" in body and "message" in body, r.text
            if rule is not None:
                assert (field, rule) in [(e["field"], e["rule"]) for e in body["errors"]], r.text

        await refused("GET", "/v1/journeys/nope/parked-timers", 404, "", None)
        await refused("POST", f"/v1/journeys/nope/parked-timers/{timer['id']}/requeue", 404, "", None)
        await refused("POST", "/v1/journeys/nope/parked-timers/discard", 404, "", None)
        await refused("GET", base, 400, "limit", "greater_than_equal", params={"limit": 0})
        await refused("GET", base, 400, "limit", "less_than_equal", params={"limit": 5000})
        await refused("GET", base, 400, "after", "cursor", params={"after": "yesterday"})
        await refused("GET", base, 400, "after", "cursor", params={"after": "1-99999999999999999999"})
        # Cursors at the ends of what a time can be, and past them; ids past 64 bits; numbers
        # Python would read but no cursor has (`1_000`, `+5`, ` 5`): a 400 naming `after`, never a 500.
        year_1, year_9999 = -62135596800000000, 253402300799999999
        for bad in (
            f"{year_1 - 1}-1",
            f"{year_9999 + 1}-1",
            "9" * 5000 + "-1",
            f"1-{2**63}",
            "1_000-1",
            "+5-1",
            " 5-1",
            "5--0",
            "5-1\n",
            "5-",
            "-1",
        ):
            await refused("GET", base, 400, "after", "cursor", params={"after": bad})
        assert len((await parked_list(h, jid, after=f"{year_1}-1"))["parked_timers"]) == 1
        assert (await parked_list(h, jid, after=f"{year_9999}-{2**63 - 1}"))["parked_timers"] == []
        await refused("GET", base, 400, "node_id", "unknown_node", params={"node_id": "wiat"})
        for action in ("requeue", "discard"):
            await refused("POST", f"{base}/0/{action}", 400, "timer_id", "greater_than_equal")
            await refused("POST", f"{base}/{2**70}/{action}", 400, "timer_id", "less_than_equal")
            await refused("POST", f"{base}/abc/{action}", 400, "timer_id", "int_parsing")
            await refused("POST", f"{base}/{timer['id'] + 1000}/{action}", 404, "timer_id", "parked")
            await refused(
                "POST", f"{base}/{action}", 400, "node_id", "unknown_node", params={"node_id": "wiat"}
            )
            await refused(
                "POST", f"{base}/{action}", 400, "nodes", "extra_forbidden", json={"nodes": ["wait"]}
            )
            # In the body, not the query (as it was first): refused, not ignored (it would take all).
            for value in ("wait", 7, None):
                await refused("POST", f"{base}/{action}", 400, "node_id", "in_query", json={"node_id": value})
            await refused("POST", f"{base}/{action}", 400, "body", "model_attributes_type", json=["wait"])
            # Another journey's parked timer, through this journey: not found, and left as it was.
            [theirs] = (await parked_list(h, other))["parked_timers"]
            await refused("POST", f"{base}/{theirs['id']}/{action}", 404, "timer_id", "parked")
        # A node id longer than any node's (1,024 bytes, as definitions bound them): refused naming
        # the rule; not quoted back in full, nor is an unknown one.
        for method, path in (("GET", base), ("POST", f"{base}/requeue"), ("POST", f"{base}/discard")):
            for node_id in ("x" * 20_000, "é" * 513):
                r = await h.client.request(method, path, params={"node_id": node_id}, headers=ADMIN)
                assert r.status_code == 400 and len(r.content) < 1000, r.text[:1000]
                assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("node_id", "max_bytes")]
            r = await h.client.request(method, path, params={"node_id": "y" * 1024}, headers=ADMIN)
            assert r.status_code == 400 and len(r.content) < 1000, r.text[:1000]
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("node_id", "unknown_node")]
        # Nothing changed.
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 2
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert {r.status for j in (jid, other) for r in await h.instances(j)} == {"active"}
        assert await h.scalar("SELECT count(*) FROM audit_log WHERE path LIKE '%parked-timers%'") == 0


async def test_a_discard_in_an_archived_journey_not_finished_yet_exits_as_the_archive_does(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archived, its customers not exited yet (the archive's answer never got to them): a discarded
    timer's customer exits as the archive (or a step) would exit them, `archived` with no goal
    window, not `timer_discarded` with one, as in a journey still live."""
    goal = {"goal": {"event": "Purchased"}}
    async with engine_running(make_settings, timer_max_attempts=1, timer_outage_passes=1) as h:
        jid = await h.journey(DELAYED | goal)
        live = await h.journey(DELAYED | goal | {"name": "Live"})
        await enter(h, ["c0", "c1"])  # each enters both
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        monkeypatch.undo()
        timers = {t["customer_id"]: t["id"] for t in (await parked_list(h, jid))["parked_timers"]}
        assert sorted(timers) == ["c0", "c1"]
        async with h.platform.engine.begin() as conn:  # its status changed, then a crash
            await conn.execute(text("UPDATE journeys SET status = 'archived' WHERE id = :j"), {"j": jid})

        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{timers['c0']}/discard", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["instance_exited"], r.json()["instance_status"], r.json()["exit_reason"]) == (
            True,
            "exited",
            "archived",
        )
        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/discard", headers=ADMIN)
        assert r.status_code == 200 and (r.json()["discarded"], r.json()["exited"]) == (1, 1), r.text
        assert {(i.customer_id, i.status, i.exit_reason) for i in await h.instances(jid)} == {
            ("c0", "exited", "archived"),
            ("c1", "exited", "archived"),
        }
        assert await h.scalar("SELECT count(*) FROM goal_windows WHERE journey_id = :j", j=jid) == 0
        exited = {n["node_id"]: n["exited"] for n in (await stats(h, jid))["versions"][0]["nodes"]}
        assert exited["wait"] == 2

        # The live journey's: `timer_discarded`, its goal window open as after any exit.
        r = await h.client.post(f"/v1/journeys/{live}/parked-timers/discard", headers=ADMIN)
        assert r.status_code == 200 and (r.json()["discarded"], r.json()["exited"]) == (2, 2), r.text
        assert {(i.status, i.exit_reason) for i in await h.instances(live)} == {("exited", "timer_discarded")}
        assert await h.scalar("SELECT count(*) FROM goal_windows WHERE journey_id = :j", j=live) == 2


async def test_an_instance_held_elsewhere_is_waited_for_a_second_at_most_or_skipped_in_bulk(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeue or discard of one timer waits for its instance (a step, an event, an erasure of the
    customer holds it) a second at most, then answers 503 `journey_busy` and changes nothing; a bulk
    one waits for none (it would hold a chunk of instances meanwhile, their customers' steps waiting
    behind it): it skips those held, leaves their timers parked and says how many."""
    async with engine_running(make_settings, timer_max_attempts=1, timer_outage_passes=1) as h:
        jid = await h.journey(DELAYED)
        await enter(h, ["c0", "c1"])
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        monkeypatch.undo()
        timers = {t["customer_id"]: t["id"] for t in (await parked_list(h, jid))["parked_timers"]}
        base = f"/v1/journeys/{jid}/parked-timers"
        async with h.platform.engine.connect() as conn:
            held = await conn.begin()
            await conn.execute(text("SELECT id FROM instances WHERE customer_id = 'c0' FOR UPDATE"))
            for action in ("requeue", "discard"):
                r = await asyncio.wait_for(
                    h.client.post(f"{base}/{timers['c0']}/{action}", headers=ADMIN), 10
                )
                assert r.status_code == 503 and r.json()["error"] == "journey_busy", r.text
                assert r.headers["retry-after"] == "1"
            for action, counts in (("requeue", ("requeued", 1)), ("discard", ("discarded", 0))):
                r = await asyncio.wait_for(h.client.post(f"{base}/{action}", headers=ADMIN), 10)
                assert r.status_code == 200, r.text
                assert (r.json()[counts[0]], r.json()["skipped"]) == (counts[1], 1), r.text
            assert [t["customer_id"] for t in (await parked_list(h, jid))["parked_timers"]] == ["c0"]
            await held.rollback()
        assert [tuple(t) for t in await h.rows("SELECT id, attempts FROM timers")] == [(timers["c1"], 0)]
        assert {(i.customer_id, i.status) for i in await h.instances(jid)} == {
            ("c0", "active"),
            ("c1", "active"),
        }

        # Free again: put back, nothing skipped.
        r = await h.client.post(f"{base}/requeue", headers=ADMIN)
        assert r.status_code == 200 and (r.json()["requeued"], r.json()["skipped"]) == (1, 0), r.text
        assert await h.fire_due() == 2
        assert sorted(m["customer_id"] for m in await h.requests(until=lambda m: len(m) >= 2)) == ["c0", "c1"]


async def test_a_stale_timer_put_back_fires_as_a_no_op_and_sends_nothing(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its customer moved on while it was parked (the awaited event came): put back, it fires as a
    no-op, as any stale timer; no message, the customer where the event took them."""
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(WAIT_CLICK)
        await h.track("c0", "Viewed")
        break_steps(h, monkeypatch, lambda row: True)
        assert await h.advance(timedelta(hours=1)) == 1  # the timeout's step fails: parked
        monkeypatch.undo()
        await h.track("c0", "Clicked")  # moves on: thanks, then out
        [(status, reason)] = [(r.status, r.exit_reason) for r in await h.instances(jid)]
        assert status == "exited"
        [timer] = (await parked_list(h, jid))["parked_timers"]
        assert (timer["holds_instance"], timer["instance_status"]) == (False, "exited")

        r = await h.client.post(f"/v1/journeys/{jid}/parked-timers/{timer['id']}/requeue", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert await h.fire_due() == 1  # fired
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert [(r.status, r.exit_reason) for r in await h.instances(jid)] == [(status, reason)]
        requests = await h.requests(idle=1.0)
        assert [m["template_id"] for m in requests] == ["thanks"]  # the event's, nothing more
        assert await h.scalar("SELECT count(*) FROM message_log") == 1


async def test_an_erasure_during_or_after_a_requeue_leaves_no_timer_and_sends_nothing(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An erasure locks the customer's instances and deletes them with their timers, parked ones
    too: a requeue waiting behind it puts back nothing (the timer is gone: 404); one done before it
    is erased with the customer, and never fires."""
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        await enter(h, ["c0", "c1"])
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        monkeypatch.undo()
        wait_longer_for_instances(monkeypatch)
        timers = {t["customer_id"]: t["id"] for t in (await parked_list(h, jid))["parked_timers"]}
        base = f"/v1/journeys/{jid}/parked-timers"

        # During: the erasure holds c0's instance (deleted, not committed yet) while the request waits.
        async with h.platform.unit_of_work() as uow:
            deleted = await privacy_store.erase(uow.session, ["c0"])
            assert (deleted["instances"], deleted["timers_parked"]) == (1, 1)
            requeue = asyncio.create_task(h.client.post(f"{base}/{timers['c0']}/requeue", headers=ADMIN))
            await eventually(lambda: blocked_by(h, uow.session))
        r = await asyncio.wait_for(requeue, 10)
        assert r.status_code == 404 and r.json()["errors"][0]["rule"] == "parked", r.text
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM instances WHERE customer_id = 'c0'") == 0

        # After: put back, then erased (through the privacy topic, as the segmenter asks) before it fires.
        r = await h.client.post(f"{base}/{timers['c1']}/requeue", headers=ADMIN)
        assert r.status_code == 200, r.text
        done = await ask(h, PrivacyAction.ERASE_REQUESTED, f"erase-{uuid.uuid4().hex}")
        assert done["action"] == "erase_completed" and done["data"]["deleted"]["timers"] == 1
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert await h.fire_due() == 0
        assert await h.instances(jid) == []
        assert await h.requests(idle=1.0) == []


async def test_requeues_and_discards_of_one_timer_racing_do_one_thing(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requeues and three discards of one timer at once: one of them does it (put back, or
    discarded and the customer out), the others are told it was done; never both."""
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        await enter(h, ["c0"])
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        monkeypatch.undo()
        wait_longer_for_instances(monkeypatch)
        [timer] = (await parked_list(h, jid))["parked_timers"]
        base = f"/v1/journeys/{jid}/parked-timers/{timer['id']}"
        answers = await asyncio.gather(
            *(h.client.post(f"{base}/{action}", headers=ADMIN) for action in ("requeue", "discard") * 3)
        )
        done = [a for a in answers if a.status_code == 200]
        assert len(done) == 1, [a.text for a in answers]
        assert {a.status_code for a in answers if a.status_code != 200} <= {404, 409}
        requeued = done[0].url.path.endswith("/requeue")
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert await h.scalar("SELECT count(*) FROM timers") == (1 if requeued else 0)
        [(status, reason)] = [(r.status, r.exit_reason) for r in await h.instances(jid)]
        assert (status, reason) == (("active", None) if requeued else ("exited", "timer_discarded"))
        await h.fire_due()
        assert len(await h.requests(idle=1.0)) == (1 if requeued else 0)


async def test_a_discard_waiting_for_a_step_in_flight_exits_no_one_the_step_moved_on(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step holds the customer's instance and moves it on; the discard waiting behind it reads the
    instance under its lock once the step committed: the timer held nobody any more, and the
    customer is not exited."""
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        await enter(h, ["c0"])
        break_steps(h, monkeypatch, lambda row: True)
        await h.advance(timedelta(hours=1))
        monkeypatch.undo()
        wait_longer_for_instances(monkeypatch)
        [timer] = (await parked_list(h, jid))["parked_timers"]
        assert timer["holds_instance"] is True
        async with h.platform.engine.connect() as conn:
            step = await conn.begin()
            await conn.execute(text("SELECT id FROM instances WHERE customer_id = 'c0' FOR UPDATE"))
            discard = asyncio.create_task(
                h.client.post(f"/v1/journeys/{jid}/parked-timers/{timer['id']}/discard", headers=ADMIN)
            )
            await eventually(lambda: blocked_by(h, conn))
            await conn.execute(text("UPDATE instances SET seq = seq + 1 WHERE customer_id = 'c0'"))
            await step.commit()
        r = await asyncio.wait_for(discard, 10)
        assert r.status_code == 200, r.text
        assert (r.json()["instance_exited"], r.json()["exit_reason"], r.json()["holds_instance"]) == (
            False,
            None,
            False,
        )
        assert [(i.status, i.exit_reason) for i in await h.instances(jid)] == [("active", None)]
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
