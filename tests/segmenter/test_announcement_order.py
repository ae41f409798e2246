"""Whole-base jobs against a real-time trait change of the same customer: the recommendations
recompute, the lifecycle stage recompute and the profile republish each announce the customer's full
traits on clm.profiles.v1. Whatever the interleaving, the real consumers (the notifier's contacts
projection: newest `occurred_at` wins; the journey engine's projection: the last message wins) must
end with the traits of the newer change, not with what the job read before it.

Each test forces one interleaving by holding one transaction open at a chosen point (`Pause`),
then feeds the segmenter's topic, as published, to a real notifier and journey engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from services.journey_engine.app import create_app as journey_engine_app
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.app import create_app as notifier_app
from services.notifier.settings import NotifierSettings
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import profiles as profile_store
from shared.contracts.topics import PROFILES
from shared.db.unit_of_work import UnitOfWork
from shared.runtime import Platform
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.segmenter.test_erasure_races import Pause
from tests.segmenter.test_job_conflicts import blocked_by
from tests.support import eventually, read_topic, running

CAMERA = {"product_id": "cam", "name": "Camera", "category": "Cameras", "price": 300}
CARD = {"product_id": "card", "name": "Memory card", "category": "Accessories", "price": 20}


def order(mid: str, user: str, *products: dict[str, Any], **fields: Any) -> Any:
    return make_event(
        mid, user_id=user, event="Order Completed", properties={"products": list(products)}, **fields
    )


def identify(mid: str, user: str, **traits: Any) -> Any:
    return make_event(mid, "identify", user_id=user, traits=traits)


async def handle(h: Harness, *events: Any) -> None:
    await h.segmenter.events.handle_in_own_unit(list(events))


@dataclass
class Projections:
    notifier: Platform
    journey_engine: Platform

    async def _one(self, platform: Platform, sql: str, **params: Any) -> Any:
        async with platform.engine.connect() as conn:
            return (await conn.execute(text(sql), params)).first()

    async def contact(self, cid: str) -> dict[str, Any]:
        row = await self._one(self.notifier, "SELECT traits FROM contacts WHERE customer_id = :c", c=cid)
        return dict(row[0]) if row else {}

    async def contact_lists(self, cid: str) -> dict[str, Any]:
        sql = "SELECT lists FROM contact_recommendations WHERE customer_id = :c"
        row = await self._one(self.notifier, sql, c=cid)
        return dict(row[0]) if row else {}

    async def journey_customer(self, cid: str) -> tuple[dict[str, Any], str | None]:
        sql = "SELECT traits, stage FROM customers WHERE customer_id = :c"
        row = await self._one(self.journey_engine, sql, c=cid)
        return (dict(row[0]), row[1]) if row else ({}, None)

    async def journey_lists(self, cid: str) -> dict[str, Any]:
        sql = "SELECT lists FROM customer_recommendations WHERE customer_id = :c"
        row = await self._one(self.journey_engine, sql, c=cid)
        return dict(row[0]) if row else {}


@contextlib.asynccontextmanager
async def consumed_by_projections(
    h: Harness, make_settings: Callable[..., Any], cid: str
) -> AsyncIterator[Projections]:
    """Everything the segmenter announced goes out; a real notifier and journey engine (their own
    schemas, the segmenter's topics) consume it from the start; yields once both have handled
    every profile message of `cid`."""
    await h.relay()
    mine = [
        m["value"]["event_id"]
        for m in await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=10)
        if m["key"] == cid
    ]
    assert mine, "nothing announced"
    notifier = notifier_app(make_settings(NotifierSettings))
    journeys = journey_engine_app(make_settings(JourneyEngineSettings, run_timer_loop=False), h.clock)
    async with running(notifier), running(journeys):
        p = Projections(notifier.state.platform, journeys.state.platform)

        async def handled(platform: Platform) -> bool:
            sql = "SELECT count(*) FROM inbox WHERE message_id = ANY(CAST(:ids AS text[]))"
            row = await p._one(platform, sql, ids=mine)
            return bool(row[0] >= len(mine))

        await eventually(lambda: handled(p.notifier), timeout=30)
        await eventually(lambda: handled(p.journey_engine), timeout=30)
        yield p


async def profile_messages(h: Harness, cid: str) -> list[dict[str, Any]]:
    msgs = await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=10)
    return [m["value"] for m in msgs if m["key"] == cid]


# Where the recompute's chunk is held while the change runs: before its first read of the customers'
# products (it has not scored them, nor locked the customers and read their traits), or once it holds
# them and has scored their lists, before it stores them (the change then waits for its commit).
@pytest.mark.parametrize("held_at", ["histories", "save_recommendations"])
async def test_a_trait_change_during_a_recommendations_recompute_is_what_consumers_keep(
    harness: Harness, make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, held_at: str
) -> None:
    h = harness
    r = await h.client.put("/v1/catalogue/items", json={"items": [CAMERA, CARD]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await handle(h, identify("i1", "u1", plan="free", email="ann@example.com"))
    await handle(h, order("o1", "u1", CAMERA))
    # Others' orders move the counts, not u1's stored lists: the recompute changes and announces them.
    await handle(h, order("o2", "c2", CAMERA, CARD), order("o3", "c3", CAMERA, CARD))

    pause = Pause(monkeypatch, catalogue_store, held_at, after=False)
    recompute = asyncio.ensure_future(h.segmenter.recommendations.recompute())
    await asyncio.wait_for(pause.reached.wait(), 10)
    h.clock.advance(timedelta(minutes=1))
    change = asyncio.ensure_future(handle(h, identify("i2", "u1", plan="pro")))
    if held_at == "histories":
        await change  # nothing holds u1 yet: the change commits before the chunk reads it
    else:  # the chunk holds u1: the change waits for it
        chunk_pid = (await pause.args[0].execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await eventually(lambda: blocked_by(h, chunk_pid), timeout=20)
    h.clock.advance(timedelta(minutes=1))  # the recompute goes on later than the change took its time
    pause.release.set()
    assert (await recompute).changed >= 1
    await change

    announced = await profile_messages(h, "u1")
    assert any(m["caused_by"].startswith("recompute:") and m["recommendations"] for m in announced)
    async with consumed_by_projections(h, make_settings, "u1") as p:
        assert (await p.contact("u1"))["plan"] == "pro"
        traits, _ = await p.journey_customer("u1")
        assert traits["plan"] == "pro"
        # The recompute's lists are delivered all the same.
        assert [e["product_id"] for e in (await p.contact_lists("u1"))["cross_sell"]][:1] == ["card"]
        assert [e["product_id"] for e in (await p.journey_lists("u1"))["cross_sell"]][:1] == ["card"]


async def test_a_trait_change_that_started_before_a_stage_recompute_is_what_consumers_keep(
    harness: Harness, make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    now = h.clock.now()
    await handle(h, identify("i1", "u1", plan="free", email="ann@example.com"))
    await handle(h, order("o1", "u1", CAMERA, timestamp=now - timedelta(days=50)))
    assert (await h.customer("u1"))["lifecycle"]["stage"] == "retention"

    # The change takes its time, then waits (before it locks u1) while the policy recompute runs.
    pause = Pause(monkeypatch, profile_store, "lock_profiles", after=False)
    h.clock.advance(timedelta(minutes=1))
    change = asyncio.ensure_future(handle(h, identify("i2", "u1", plan="pro")))
    await asyncio.wait_for(pause.reached.wait(), 10)
    h.clock.advance(timedelta(minutes=1))
    r = await h.client.put(
        "/v1/lifecycle/stages", json={"thresholds": {"onboarding_days": 60}}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["recomputed"]["stage_changes"] == 1, r.text
    pause.release.set()
    await change

    stage = [m for m in await profile_messages(h, "u1") if m["kind"] == "stage_changed"][-1]
    assert stage["lifecycle_stage"] == "onboarding" and stage["traits"]["plan"] == "free"
    async with consumed_by_projections(h, make_settings, "u1") as p:
        assert (await p.contact("u1"))["plan"] == "pro"
        traits, journey_stage = await p.journey_customer("u1")
        assert traits["plan"] == "pro" and journey_stage == "onboarding"


async def test_a_trait_change_committing_during_a_republish_is_what_consumers_keep(
    harness: Harness, make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    await handle(h, identify("i1", "u1", plan="free", email="ann@example.com"))

    # The change has written its announcement to the outbox and holds u1, not committed yet ...
    flushed = Pause(monkeypatch, UnitOfWork, "_flush_outbox", after=True)
    h.clock.advance(timedelta(minutes=1))
    change = asyncio.ensure_future(handle(h, identify("i2", "u1", plan="pro")))
    await asyncio.wait_for(flushed.reached.wait(), 10)
    # ... while a republish chunk would read u1 and write its snapshot (held before its commit): it
    # waits for the change's lock ...
    snapshot = Pause(monkeypatch, profile_store, "snapshot_chunk", after=True)
    job = await h.segmenter.republisher.start()
    assert job is not None
    changing: UnitOfWork = flushed.args[0]
    pid = (await changing.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    await eventually(lambda: blocked_by(h, pid), timeout=20)
    assert not snapshot.reached.is_set()
    # ... and commits before the chunk does.
    flushed.release.set()
    await change
    await asyncio.wait_for(snapshot.reached.wait(), 10)
    snapshot.release.set()
    await h.segmenter.republisher.wait()
    assert job.error is None

    snapshots = [m for m in await profile_messages(h, "u1") if m["kind"] == "snapshot"]
    assert [m["traits"]["plan"] for m in snapshots] == ["pro"]
    async with consumed_by_projections(h, make_settings, "u1") as p:
        assert (await p.contact("u1"))["plan"] == "pro"
        traits, _ = await p.journey_customer("u1")
        assert traits["plan"] == "pro"


async def test_a_recompute_never_stores_lists_older_than_the_customers_own_order(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recompute scores a chunk before it holds the customers; an order committing in between
    has stored lists from the products it added, which the chunk's must not replace."""
    h = harness
    r = await h.client.put("/v1/catalogue/items", json={"items": [CAMERA, CARD]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await handle(h, order("o1", "u1", CAMERA))
    await handle(h, order("o2", "c2", CAMERA, CARD), order("o3", "c3", CAMERA, CARD))

    pause = Pause(monkeypatch, catalogue_store, "lock_customers", after=False)
    recompute = asyncio.ensure_future(h.segmenter.recommendations.recompute())
    await asyncio.wait_for(pause.reached.wait(), 10)  # u1's lists scored: the card first
    h.clock.advance(timedelta(minutes=1))
    await handle(h, order("o4", "u1", CARD))  # now u1 owns it
    pause.release.set()
    await recompute

    stored = (await h.customer("u1"))["recommendations"]
    assert "card" not in [e["product_id"] for e in stored["cross_sell"]]
    await h.relay()
    lists = [m["recommendations"] for m in await profile_messages(h, "u1") if m["recommendations"]]
    assert "card" not in [e["product_id"] for e in lists[-1]["cross_sell"]]


async def test_a_change_that_took_its_time_before_anothers_commit_is_dated_after_it(
    harness: Harness, make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch takes its time before it locks its customers: one that locks after a batch that took
    a later time has committed dates its change (updated_at, announcements) by that later time, not
    its own, or the notifier (newest wins) would keep the change it follows."""
    h = harness
    await handle(h, identify("i1", "u1", plan="free", email="ann@example.com"))
    first = Pause(monkeypatch, profile_store, "lock_profiles", after=False)
    h.clock.advance(timedelta(minutes=1))
    slow = asyncio.ensure_future(handle(h, identify("i2", "u1", plan="pro")))
    await asyncio.wait_for(first.reached.wait(), 10)  # took its time, not holding u1 yet
    h.clock.advance(timedelta(minutes=1))
    later = h.clock.now()
    await handle(h, identify("i3", "u1", seen=1))  # took a later time, commits first
    first.release.set()
    await slow

    messages = await profile_messages(h, "u1")
    assert [(m["caused_by"], m["traits"].get("plan"), m["occurred_at"]) for m in messages[-2:]] == [
        ("i3", "free", later.isoformat().replace("+00:00", "Z")),
        ("i2", "pro", later.isoformat().replace("+00:00", "Z")),
    ]
    async with consumed_by_projections(h, make_settings, "u1") as p:
        assert await p.contact("u1") == {"plan": "pro", "seen": 1, "email": "ann@example.com"}
        traits, _ = await p.journey_customer("u1")
        assert traits["plan"] == "pro"


async def test_recomputed_lists_replace_lists_an_earlier_release_dated_by_its_clock(
    harness: Harness, make_settings: Callable[..., Any]
) -> None:
    """Before lists were dated by the profile's last change, the recompute dated them by its clock:
    stored lists, and the notifier's, are dated later than the profile's last change. A recompute's
    new lists must still replace them in the notifier (newest wins), not wait for the customer's
    next order."""
    h = harness
    r = await h.client.put("/v1/catalogue/items", json={"items": [CAMERA, CARD]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await handle(h, identify("i1", "u1", email="ann@example.com"))
    await handle(h, order("o1", "u1", CAMERA))
    release_clock = h.clock.now() + timedelta(hours=1)  # that release's recompute, an hour later
    async with h.segmenter.platform.unit_of_work() as uow:
        sql = "UPDATE customer_recommendations SET updated_at = :at WHERE customer_id = 'u1'"
        await uow.session.execute(text(sql), {"at": release_clock})
    h.clock.advance(timedelta(hours=2))
    await handle(h, order("o2", "c2", CAMERA, CARD), order("o3", "c3", CAMERA, CARD))

    async with consumed_by_projections(h, make_settings, "u1") as p:
        assert await p.contact_lists("u1") == {"cross_sell": [], "upsell": []}
        for table in ("contact_recommendations", "contacts"):  # as that release's message left them
            async with p.notifier.unit_of_work() as uow:
                sql = f"UPDATE {table} SET profile_at = :at WHERE customer_id = 'u1'"
                await uow.session.execute(text(sql), {"at": release_clock})
        assert (await h.segmenter.recommendations.recompute()).changed >= 1
        await h.relay()
        recomputed = [m for m in await profile_messages(h, "u1") if m["caused_by"].startswith("recompute:")]
        assert len(recomputed) == 1
        assert recomputed[0]["occurred_at"] == release_clock.isoformat().replace("+00:00", "Z")

        async def lists_delivered() -> bool:
            lists = await p.contact_lists("u1")
            return [e["product_id"] for e in lists["cross_sell"]][:1] == ["card"]

        await eventually(lists_delivered, timeout=30)
    async with h.segmenter.platform.engine.connect() as conn:
        sql = "SELECT updated_at FROM customer_recommendations WHERE customer_id = 'u1'"
        assert (await conn.execute(text(sql))).scalar_one() == release_clock
