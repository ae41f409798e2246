"""Timers survive a stopped engine and fire exactly once, even with two engines racing on one table;
a batch that an outage or a passing condition of the database failed rolls back, counts nothing, and
its timers fire on a later pass; a timer whose step keeps failing for a reason of its own is tried
again later, then parked, and the others fire."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.journey_engine.execution import db_errors
from services.journey_engine.execution.engine import TimersFailing
from services.journey_engine.store import instances as instance_store
from services.journey_engine.store import journeys as journey_store
from shared.clock import ManualClock
from shared.db.engine import Statement
from shared.db.errors import sqlstate as shared_sqlstate
from tests.journey_engine.harness import ADMIN, START, engine_running
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import eventually

DELAYED = linear(
    "Delayed",
    "Signed Up",
    [
        {"id": "wait", "type": "delay", "duration": "PT1H"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "later"},
    ],
)
CUSTOMERS = 120


async def test_timers_due_while_stopped_fire_once_across_two_racing_engines(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    async with engine_running(make_settings, clock=clock) as h:
        jid = await h.journey(DELAYED)
        for i in range(CUSTOMERS):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        assert await h.scalar("SELECT count(*) FROM timers") == CUSTOMERS
    clock.advance(timedelta(hours=3))  # every timer came due while no engine ran

    async with (
        engine_running(make_settings, clock=clock, timer_batch_size=7) as one,
        engine_running(make_settings, clock=clock, timer_batch_size=7) as two,
    ):
        # The database lost mid-batch: the step fails after claiming, the transaction rolls back,
        # nothing is lost, and nothing is parked however often it happens (an outage is retried as
        # long as it lasts).
        def explode(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("connection to the database lost mid-step")

        monkeypatch.setattr(one.engine, "_react", explode)
        for _ in range(one.settings.timer_max_attempts + 1):
            with pytest.raises(ConnectionError):
                await one.engine.run_once()
        assert await one.scalar("SELECT count(*) FROM timers") == CUSTOMERS
        assert await one.scalar("SELECT count(*) FROM timers_parked") == 0
        monkeypatch.undo()

        claimed = await asyncio.gather(one.fire_due(), two.fire_due(), one.fire_due(), two.fire_due())
        assert sum(claimed) == CUSTOMERS
        assert claimed[0] + claimed[2] > 0 and claimed[1] + claimed[3] > 0  # both engines did work
        assert await one.scalar("SELECT count(*) FROM timers") == 0
        assert await one.scalar("SELECT count(*) FROM message_log") == CUSTOMERS
        assert {r.status for r in await one.instances(jid)} == {"exited"}
        requests = await one.requests(until=lambda m: len(m) >= CUSTOMERS, idle=1.0)
        assert len(requests) == CUSTOMERS
        assert len({m["message_id"] for m in requests}) == CUSTOMERS
        stats = (
            await one.client.get(
                f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
            )
        ).json()
        nodes = {n["node_id"]: n for n in stats["versions"][0]["nodes"]}
        assert nodes["wait"]["passed"] == CUSTOMERS and nodes["mail"]["passed"] == CUSTOMERS


async def test_background_timer_loop_fires_due_timers_by_itself(make_settings: Any) -> None:
    clock = ManualClock(START)
    async with engine_running(
        make_settings, clock=clock, run_timer_loop=True, timer_poll_interval_s=0.05
    ) as h:
        jid = await h.journey(DELAYED)
        await h.track("solo", "Signed Up")
        clock.advance(timedelta(hours=1))

        async def exited() -> bool:
            return [r.status for r in await h.instances(jid)] == ["exited"]

        await eventually(exited, timeout=10)
        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["customer_id"] == "solo" and request["template_id"] == "later"


async def test_the_timer_worker_looks_for_due_broadcasts_less_often_than_for_timers(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each look is a transaction on every replica: timers every 20 ms here, broadcasts every 300 ms.
    async with engine_running(make_settings, timer_poll_interval_s=0.02, broadcast_poll_interval_s=0.3) as h:
        passes, looks = 0, 0
        run_once, run_due_broadcasts = h.engine.run_once, h.engine.run_due_broadcasts

        async def counted_pass(*, broadcasts: bool = True) -> int:
            nonlocal passes
            passes += 1
            return await run_once(broadcasts=broadcasts)

        async def counted_look() -> int:
            nonlocal looks
            looks += 1
            return await run_due_broadcasts()

        monkeypatch.setattr(h.engine, "run_once", counted_pass)
        monkeypatch.setattr(h.engine, "run_due_broadcasts", counted_look)
        worker = asyncio.create_task(h.engine.run_forever())
        try:
            await eventually(lambda: passes >= 30, timeout=30)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        assert 1 <= looks < passes / 3


def parked_total(journey_id: str) -> float:
    return REGISTRY.get_sample_value("clm_journey_timers_parked_total", {"journey": journey_id}) or 0.0


def long_id_journey(send_node: str) -> dict[str, Any]:
    return linear(
        "Long id",
        "Signed Up",
        [
            {"id": "wait", "type": "delay", "duration": "PT1H"},
            {"id": send_node, "type": "send", "channel": "email", "template_id": "x"},
        ],
    )


async def test_a_timer_whose_step_keeps_failing_is_retried_later_then_parked_and_the_others_fire(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        # Saved before node ids were limited (the API refuses it now): every message id of its send
        # node is too long for the message log's key (incompressible: PostgreSQL compresses a long
        # index entry), so the step after the delay always fails.
        long_id = "n" + secrets.token_urlsafe(2900)[:2900]
        async with h.platform.unit_of_work() as uow:
            await journey_store.create(
                uow.session, "longid", "Long id", long_id_journey(long_id), None, h.clock.now()
            )
        assert (await h.client.post("/v1/journeys/longid/activate", headers=ADMIN)).status_code == 200
        good = await h.journey(DELAYED)
        customers = [f"c{i}" for i in range(5)]
        for c in customers:
            await h.track(c, "Signed Up", wait=False)
        await h.processed("events")
        before = parked_total("longid")

        # Before, the batch failed as a whole, was claimed first again on every pass, and no timer of
        # any journey fired. Now the failing timers are found, and tried again later; the others fire.
        assert await h.advance(timedelta(hours=1)) == 2 * len(customers)
        assert {(r.status, r.node_id) for r in await h.instances(good)} == {("exited", "done")}
        requests = await h.requests(until=lambda m: len(m) >= len(customers))
        assert sorted(m["customer_id"] for m in requests) == customers
        retry_s = h.settings.timer_retry_s
        due = h.clock.now() + timedelta(seconds=retry_s)
        assert [tuple(t) for t in await h.rows("SELECT DISTINCT attempts, due_at FROM timers")] == [(1, due)]
        assert await h.scalar("SELECT count(*) FROM timers") == len(customers)
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert await h.advance(timedelta(seconds=retry_s - 1)) == 0  # not again at once
        # Its timers all fail (one journey's broken node: counted, or they would hold back the
        # timers due after them), 60 s later, then 120 s after that, and are parked at the third try.
        assert await h.advance(timedelta(seconds=1)) == len(customers)
        assert {tuple(t) for t in await h.rows("SELECT attempts FROM timers")} == {(2,)}
        assert await h.advance(timedelta(seconds=2 * retry_s)) == len(customers)
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        parked = await h.rows(
            "SELECT instance_id, seq, attempts, error FROM timers_parked ORDER BY instance_id"
        )
        stuck = {r.customer_id: r for r in await h.instances("longid")}
        assert {(r.status, r.node_id) for r in stuck.values()} == {("active", "wait")}  # where it waited
        assert len(parked) == len(customers)
        assert {p.attempts for p in parked} == {h.settings.timer_max_attempts}  # the tries it had
        assert all("index row size" in p.error and "message_log_pkey" in p.error for p in parked)
        assert all("INSERT" not in p.error for p in parked)  # the statement and its data are not kept
        assert parked_total("longid") - before == len(customers)
        assert await h.engine.run_once() == 0  # nothing jams the next pass
        # The journey's stats count them, the instances listing marks them.
        stats = (await h.client.get("/v1/journeys/longid/stats", headers=ADMIN)).json()
        assert stats["timers_parked"] == len(customers)
        assert (await h.client.get(f"/v1/journeys/{good}/stats", headers=ADMIN)).json()["timers_parked"] == 0
        listed = (await h.client.get("/v1/journeys/longid/instances", headers=ADMIN)).json()["instances"]
        assert [(i["status"], i["node_id"], i["timer_parked"]) for i in listed] == [
            ("active", "wait", True)
        ] * len(customers)

        # Fixed (a new version the customers move to), the parked timers put back fire.
        r = await h.client.put(
            "/v1/journeys/longid",
            headers=ADMIN,
            json={"definition": long_id_journey("mail"), "migrate": True},
        )
        assert r.status_code == 200 and r.json()["migrated"] == len(customers), r.text
        r = await h.client.post("/v1/journeys/longid/parked-timers/requeue", headers=ADMIN)
        assert r.status_code == 200 and r.json()["requeued"] == len(customers), r.text
        assert await h.fire_due() == len(customers)
        assert {(r.status, r.node_id) for r in await h.instances("longid")} == {("exited", "done")}
        assert await h.scalar("SELECT count(*) FROM message_log WHERE template_id = 'x'") == len(customers)
        assert (await h.client.get("/v1/journeys/longid/stats", headers=ADMIN)).json()["timers_parked"] == 0
        listed = (await h.client.get("/v1/journeys/longid/instances", headers=ADMIN)).json()["instances"]
        assert {i["timer_parked"] for i in listed} == {False}


def raises_in_the_database(sqlstate: str, *, wrapped: bool = True) -> Callable[..., Awaitable[None]]:
    """A step that meets a condition of the database with this SQLSTATE, raised by PostgreSQL itself:
    through SQLAlchemy (wrapped, `orig`) or straight from asyncpg (as the `Statement`s meet it)."""
    sql = f"DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '{sqlstate}'; END $$"

    async def step(uow: Any, *args: Any) -> None:
        if wrapped:
            await uow.session.execute(text(sql))
        else:
            await Statement(sql).execute(uow.session)

    return step


@pytest.mark.parametrize("caps", [False, True])
async def test_a_step_that_fails_once_is_not_parked(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, caps: bool
) -> None:
    """A deadlock (an erasure locks instances then their timers, a claim a timer then its instance)
    is retried at once and counts nothing: every timer fires in the same pass. A failure of the
    step's own is one try of that timer alone: the others fire, it fires at its next try. (With
    frequency caps the customers are locked too.)"""
    overrides = {"frequency_caps": {"email": {"limit": 10, "period": "day"}}} if caps else {}
    async with engine_running(make_settings, **overrides) as h:
        jid = await h.journey(DELAYED)
        for i in range(8):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        react, failed = h.engine._react, []
        deadlock = raises_in_the_database("40P01")

        async def fails_once(uow: Any, writer: Any, row: Any, *args: Any) -> bool:
            if row.customer_id == "c3" and not failed:
                failed.append(row.id)
                await deadlock(uow)
            return await react(uow, writer, row, *args)

        monkeypatch.setattr(h.engine, "_react", fails_once)
        errors = REGISTRY.get_sample_value("clm_journey_timer_errors_total") or 0.0
        h.clock.advance(timedelta(hours=1))
        assert await h.engine.run_once() == 8
        assert len(failed) == 1
        assert {r.status for r in await h.instances(jid)} == {"exited"}
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert await h.scalar("SELECT count(*) FROM message_log") == 8
        assert (REGISTRY.get_sample_value("clm_journey_timer_errors_total") or 0.0) == errors

        # A failure of the step's own, for a while: one try of that timer alone, the next one later.
        for i in range(8, 16):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        broken = [True]

        async def bug_for_a_while(uow: Any, writer: Any, row: Any, *args: Any) -> bool:
            if row.customer_id == "c11" and broken[0]:
                raise RuntimeError("a bug that a later try does not meet")
            return await react(uow, writer, row, *args)

        monkeypatch.setattr(h.engine, "_react", bug_for_a_while)
        h.clock.advance(timedelta(hours=1))
        assert await h.engine.run_once() == 8
        waiting = [r.customer_id for r in await h.instances(jid) if r.status == "active"]
        assert waiting == ["c11"]
        assert [tuple(t) for t in await h.rows("SELECT attempts FROM timers")] == [(1,)]
        broken[0] = False
        assert await h.advance(timedelta(seconds=h.settings.timer_retry_s)) == 1
        assert {r.status for r in await h.instances(jid)} == {"exited"}
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert await h.scalar("SELECT count(*) FROM message_log") == 16


@pytest.mark.parametrize(
    ("sqlstate", "wrapped"),
    [
        ("40P01", True),  # deadlock_detected
        ("40P01", False),
        ("40001", True),  # serialization_failure
        ("55P03", True),  # lock_not_available
        ("57014", True),  # query_canceled (statement_timeout)
        ("53100", False),  # disk_full
        ("53200", True),  # out_of_memory
        ("58030", True),  # io_error
    ],
)
async def test_a_passing_condition_of_the_database_parks_no_timer(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, sqlstate: str, wrapped: bool
) -> None:
    """However many passes the condition lasts: every step fails, nothing is counted or parked, and
    every timer fires once it is over. (Before, one pass parked every due timer.)"""
    async with engine_running(make_settings) as h:
        jid = await h.journey(DELAYED)
        for i in range(6):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        monkeypatch.setattr(h.engine, "_react", raises_in_the_database(sqlstate, wrapped=wrapped))
        h.clock.advance(timedelta(hours=1))
        for _ in range(h.settings.timer_max_attempts + 1):
            with pytest.raises(Exception) as exc:
                await h.engine.run_once()
            assert shared_sqlstate(exc.value) == sqlstate and db_errors.is_transient(exc.value)
            h.clock.advance(timedelta(seconds=h.settings.timer_retry_s))
        assert [tuple(t) for t in await h.rows("SELECT DISTINCT attempts FROM timers")] == [(0,)]
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        monkeypatch.undo()
        assert await h.fire_due() == 6
        assert {r.status for r in await h.instances(jid)} == {"exited"}


async def test_a_batch_whose_every_timer_fails_in_several_journeys_is_taken_for_an_outage(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step failing, of every journey (a release that fails them all, a condition the engine
    does not know): nothing is counted or parked, the loop retries with backoff."""
    async with engine_running(make_settings) as h:
        first = await h.journey(DELAYED)
        second = await h.journey(DELAYED)
        for i in range(3):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")

        def broken(*args: Any) -> None:
            raise RuntimeError("every step fails")

        monkeypatch.setattr(h.engine, "_react", broken)
        h.clock.advance(timedelta(hours=1))
        retry_s = h.settings.timer_retry_s
        for _ in range(h.settings.timer_max_attempts + 1):
            with pytest.raises(TimersFailing, match="all 6 timers of the batch failed alone, in 2 journeys"):
                await h.engine.run_once()
            # Put off to their retry time, no try counted: the timers due after them get their turn.
            due = h.clock.now() + timedelta(seconds=retry_s)
            assert [tuple(t) for t in await h.rows("SELECT DISTINCT attempts, due_at FROM timers")] == [
                (0, due)
            ]
            assert await h.engine.run_once() == 0
            h.clock.advance(timedelta(seconds=retry_s))
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        monkeypatch.undo()
        assert await h.fire_due() == 6
        assert {r.status for j in (first, second) for r in await h.instances(j)} == {"exited"}


async def test_stale_timers_firing_as_no_ops_do_not_tell_a_release_that_fails_every_step_from_broken_journeys(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale timer (its instance moved on: every wait whose event came leaves one) fires as a
    no-op, stepping nothing: neither in the probe of other journeys nor in the batch itself does it
    say that steps work. With every step failing, nothing is counted or parked. (Before, one such
    timer made the engine count tries on every failing timer and park them within minutes.)"""
    async with engine_running(make_settings, timer_batch_size=6) as h:
        a = await h.journey(DELAYED)
        b = await h.journey(DELAYED)
        for i in range(3):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        h.clock.advance(timedelta(minutes=1))
        c = await h.journey(DELAYED | {"name": "Other"})
        await h.track("s", "Signed Up", wait=False)  # enters A, B and C, a minute later
        await h.processed("events")

        async def move_on(customer: str, journey: str) -> None:
            async with h.platform.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE instances SET seq = seq + 1 WHERE customer_id = :c AND journey_id = :j"),
                    {"c": customer, "j": journey},
                )

        await move_on("s", c)  # C's only timer is stale

        def broken(*args: Any) -> None:
            raise RuntimeError("every step fails (a broken release)")

        monkeypatch.setattr(h.engine, "_react", broken)
        retry_s = h.settings.timer_retry_s

        async def untried() -> None:
            assert [tuple(t) for t in await h.rows("SELECT DISTINCT attempts FROM timers")] == [(0,)]

        # The probe past the oldest batch (A's and B's c0-c2) finds C's stale timer only: an outage.
        h.clock.advance(timedelta(hours=1))
        with pytest.raises(TimersFailing, match="all 6 timers of the batch failed alone, in 2 journeys"):
            await h.engine.run_once()
        h.clock.advance(timedelta(seconds=1))  # s's timers are put off a second after the others
        with pytest.raises(TimersFailing, match="all 2 timers of the batch failed alone, in 2 journeys"):
            await h.engine.run_once()
        await untried()
        assert await h.scalar("SELECT count(*) FROM timers") == 8

        # A stale timer in the batch itself (c0 moved on in A) fires as a no-op: an outage still.
        await move_on("c0", a)
        for _ in range(h.settings.timer_max_attempts + 1):
            h.clock.advance(timedelta(seconds=retry_s - 1))
            with pytest.raises(TimersFailing, match="of the batch failed alone, in 2 journeys"):
                await h.engine.run_once()
            h.clock.advance(timedelta(seconds=1))
            with pytest.raises(TimersFailing, match="all 2 timers of the batch failed alone, in 2 journeys"):
                await h.engine.run_once()
            await untried()
        assert await h.scalar("SELECT count(*) FROM timers") == 7
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        monkeypatch.undo()
        h.clock.advance(timedelta(seconds=retry_s))
        assert await h.fire_due() == 7
        assert {
            r.status for j in (a, b) for r in await h.instances(j) if (r.customer_id, j) != ("c0", a)
        } == {"exited"}


async def test_a_timer_that_cannot_be_recorded_or_was_parked_before_holds_back_no_other(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        for i in range(4):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        react = h.engine._react
        ids = {r.customer_id: r.id for r in await h.rows("SELECT customer_id, id FROM instances")}
        timers = {r.instance_id: r.id for r in await h.rows("SELECT instance_id, id FROM timers")}
        # c1's timer was parked before under its id (put back by hand with it, say): parked again,
        # the row replaced. Recording c2's failure fails: logged, the other timers go on.
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO timers_parked (id, instance_id, seq, due_at, parked_at, attempts, error) "
                    "VALUES (:id, :i, 0, :t, :t, 3, 'before')"
                ),
                {"id": timers[ids["c1"]], "i": ids["c1"], "t": h.clock.now()},
            )

        async def fails(uow: Any, writer: Any, row: Any, *args: Any) -> bool:
            if row.customer_id in ("c1", "c2"):
                raise RuntimeError(f"{row.customer_id}'s step fails")
            return await react(uow, writer, row, *args)

        note = instance_store.note_timer_failure

        async def note_fails_for_c2(session: Any, timer_id: int, *args: Any, **kwargs: Any) -> Any:
            if timer_id == timers[ids["c2"]]:
                raise RuntimeError("the failure could not be recorded")
            return await note(session, timer_id, *args, **kwargs)

        monkeypatch.setattr(h.engine, "_react", fails)
        monkeypatch.setattr(instance_store, "note_timer_failure", note_fails_for_c2)
        h.clock.advance(timedelta(hours=1))
        assert await h.engine.run_once() == 4
        statuses = {r.customer_id: r.status for r in await h.instances(jid)}
        assert statuses == {"c0": "exited", "c1": "active", "c2": "active", "c3": "exited"}
        parked = await h.rows("SELECT instance_id, attempts, error FROM timers_parked")
        assert [tuple(p) for p in parked] == [(ids["c1"], 1, "RuntimeError: c1's step fails")]
        # c2's stays due as it was, and is met again by the next pass.
        assert [tuple(t) for t in await h.rows("SELECT instance_id, attempts FROM timers")] == [
            (ids["c2"], 0)
        ]
        monkeypatch.undo()
        assert await h.engine.run_once() == 1
        assert [r.status for r in await h.instances(jid)].count("exited") == 3


async def test_workers_racing_on_a_failing_timer_count_one_try_and_keep_its_retry_time(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several timer workers (2 a replica by default) meet the same failing timer: the first to
    record its failure puts it off; the others neither count another try nor fire it before its
    next try. (Before, 3 workers used up its tries in one pass and parked it with no retry at all;
    a worker taking a batch apart fired a timer another had just put off for later.)"""
    clock = ManualClock(START)
    async with (
        engine_running(make_settings, clock=clock) as one,
        engine_running(make_settings, clock=clock) as two,
        engine_running(make_settings, clock=clock) as three,
    ):
        jid = await one.journey(DELAYED)
        for i in range(6):
            await one.track(f"c{i}", "Signed Up", wait=False)
        await one.processed("events")
        tries: list[str] = []
        for h in (one, two, three):

            async def fails(
                uow: Any, writer: Any, row: Any, *args: Any, _react: Any = h.engine._react
            ) -> None:
                if row.customer_id == "c3":
                    tries.append(row.id)
                    raise RuntimeError("c3's step fails")
                await _react(uow, writer, row, *args)

            monkeypatch.setattr(h.engine, "_react", fails)
        retry_s = one.settings.timer_retry_s

        # Another worker's whole pass runs while this one is between taking the batch apart and
        # recording what failed alone, twice over.
        for this, other in ((one.engine, two.engine), (two.engine, three.engine)):

            async def interleaved(
                fired: Any, failed: Any, _orig: Any = this._failed_alone, _other: Any = other
            ) -> Any:
                await _other.run_once(broadcasts=False)
                return await _orig(fired, failed)

            monkeypatch.setattr(this, "_failed_alone", interleaved)
        clock.advance(timedelta(hours=1))
        await one.engine.run_once(broadcasts=False)
        assert [tuple(t) for t in await one.rows("SELECT attempts, due_at FROM timers")] == [
            (1, clock.now() + timedelta(seconds=retry_s))
        ]
        assert await one.scalar("SELECT count(*) FROM timers_parked") == 0
        waiting = [r.customer_id for r in await one.instances(jid) if r.status == "active"]
        assert waiting == ["c3"]

        # A worker taking a batch apart after another put the timer off does not fire it early.
        monkeypatch.setattr(one.engine, "_failed_alone", type(one.engine)._failed_alone.__get__(one.engine))
        isolate = one.engine._isolate

        async def after_another_pass(timers: Any, error: Any) -> Any:
            await two.engine.run_once(broadcasts=False)
            return await isolate(timers, error)

        monkeypatch.setattr(one.engine, "_isolate", after_another_pass)
        monkeypatch.setattr(two.engine, "_failed_alone", type(two.engine)._failed_alone.__get__(two.engine))
        clock.advance(timedelta(seconds=retry_s))
        before = len(tries)
        await one.engine.run_once(broadcasts=False)
        # Tried by one's batch, then by two's pass (counted, put off 120 s); one's halves skip it.
        assert len(tries) - before == 2
        assert [tuple(t) for t in await one.rows("SELECT attempts, due_at FROM timers")] == [
            (2, clock.now() + timedelta(seconds=2 * retry_s))
        ]
        assert await one.scalar("SELECT count(*) FROM timers_parked") == 0


async def test_timers_failing_in_several_journeys_hold_back_no_other_journey_nor_broadcasts(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two journeys whose steps all fail (a broken node each, many customers waiting) fill the
    oldest batch: a due timer of another journey still fires, in the same pass, and the failures
    are then the journeys' own (counted, retried, parked as usual); when nothing else is due they
    are put off without a try counted, `timer_outage_passes` times, and the due broadcasts run all
    the same. (Before, such a batch was taken for an outage on every pass, claimed first again and
    again: no other timer of any journey fired, and no broadcast ran.)"""
    async with engine_running(make_settings, timer_batch_size=4, timer_outage_passes=3) as h:
        a = await h.journey(DELAYED)
        b = await h.journey(DELAYED)
        for i in range(4):
            await h.track(f"c{i}", "Signed Up", wait=False)  # 8 broken timers: two full batches
        await h.processed("events")
        h.clock.advance(timedelta(minutes=30))
        healthy = await h.journey(DELAYED | {"name": "Healthy"})
        # Due 30 min after the others (and 2 more broken timers: the customer enters all three).
        await h.track("healthy-customer", "Signed Up", wait=False)
        await h.processed("events")
        react = h.engine._react

        async def broken(uow: Any, writer: Any, row: Any, *args: Any) -> bool:
            if row.journey_id in (a, b):
                raise RuntimeError("broken node")
            return await react(uow, writer, row, *args)

        monkeypatch.setattr(h.engine, "_react", broken)
        looked: list[int] = []
        run_due_broadcasts = h.engine.run_due_broadcasts

        async def broadcasts() -> int:
            looked.append(1)
            return await run_due_broadcasts()

        monkeypatch.setattr(h.engine, "run_due_broadcasts", broadcasts)

        # Only the broken journeys' timers are due: put off, nothing counted, broadcasts looked for.
        h.clock.advance(timedelta(minutes=30))
        for _ in range(2):
            with pytest.raises(
                TimersFailing, match="in 2 journeys, and no other journey's timer stepped its instance"
            ):
                await h.engine.run_once()
        assert len(looked) == 2
        assert [tuple(t) for t in await h.rows("SELECT DISTINCT attempts FROM timers")] == [(0,)]
        assert await h.engine.run_once() == 0  # nothing left due now

        # The healthy journey's timer comes due behind them: it fires in the first pass, and the
        # broken timers are counted as their journeys' own.
        h.clock.advance(timedelta(minutes=30))
        assert await h.engine.run_once() == 4
        assert [r.status for r in await h.instances(healthy)] == ["exited"]
        assert await h.scalar("SELECT count(*) FROM timers WHERE attempts = 1") == 4
        assert len(looked) == 3
        # Nothing else due now: the broken timers are put off, and counted anyway once taken for an
        # outage 3 times, then retried and parked as usual; not tried for ever.
        for _ in range(30):
            with contextlib.suppress(TimersFailing):
                await h.engine.run_once()
            h.clock.advance(timedelta(minutes=10))
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 10
        assert {r.status for j in (a, b) for r in await h.instances(j)} == {"active"}


async def test_parked_timers_of_customers_no_longer_held_are_not_counted(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stats' `timers_parked` and the listing's `timer_parked` count the customers a parked
    timer holds: not one whose instance has exited since (an archive), nor moved on from that step."""
    async with engine_running(make_settings, timer_max_attempts=1) as h:
        jid = await h.journey(DELAYED)
        for c in ("c0", "c1"):
            await h.track(c, "Signed Up", wait=False)
        await h.processed("events")

        def broken(*args: Any) -> None:
            raise RuntimeError("the step fails")

        monkeypatch.setattr(h.engine, "_react", broken)
        assert await h.advance(timedelta(hours=1)) == 2
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 2
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        assert stats["timers_parked"] == 2
        # c1 moves on from the step (as a migration or an event would), then every customer exits.
        async with h.platform.engine.begin() as conn:
            await conn.execute(text("UPDATE instances SET seq = seq + 1 WHERE customer_id = 'c1'"))
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        assert stats["timers_parked"] == 1
        listed = (await h.client.get(f"/v1/journeys/{jid}/instances", headers=ADMIN)).json()["instances"]
        assert sorted((i["customer_id"], i["timer_parked"]) for i in listed) == [("c0", True), ("c1", False)]
        assert (await h.client.post(f"/v1/journeys/{jid}/archive", headers=ADMIN)).status_code == 200

        async def none_active() -> bool:
            return await h.scalar("SELECT count(*) FROM instances WHERE status = 'active'") == 0

        await eventually(none_active)
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        assert stats["timers_parked"] == 0
        listed = (await h.client.get(f"/v1/journeys/{jid}/instances", headers=ADMIN)).json()["instances"]
        assert {i["timer_parked"] for i in listed} == {False}
