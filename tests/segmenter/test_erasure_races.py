"""Erasure against the background writers: a back-fill chunk, a recommendations recompute chunk or a
republish chunk in flight while a customer is erased must not leave the erased customer's rows (or
a profile snapshot published after the erasure) behind.

Each test holds the writer's transaction open at the point where it has read the customer and is
about to commit, erases the customer meanwhile, then lets the writer finish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.contracts.topics import PROFILES
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.support import read_topic


class Pause:
    """Wraps `module.name` so that its next call stops before (or after) running until released;
    `args`: that call's positional arguments."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, *, after: bool) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.args: tuple[Any, ...] = ()
        original: Callable[..., Awaitable[Any]] = getattr(module, name)

        async def paused(*args: Any, **kwargs: Any) -> Any:
            if not self.reached.is_set():
                self.args = args
            if not after:
                await self._hold()
            result = await original(*args, **kwargs)
            if after:
                await self._hold()
            return result

        monkeypatch.setattr(module, name, paused)

    async def _hold(self) -> None:
        if not self.reached.is_set():
            self.reached.set()
            await self.release.wait()


async def erase_while_paused(h: Harness, pause: Pause, writer: Awaitable[Any], ref: str) -> None:
    """Run `writer` to the pause, erase `ref` meanwhile (giving it time to finish if nothing holds
    it back), let the writer go on, and wait for both."""
    task = asyncio.ensure_future(writer)
    await asyncio.wait_for(pause.reached.wait(), 10)
    erase: asyncio.Task[httpx.Response] = asyncio.create_task(
        h.client.delete(f"/v1/customers/{ref}", headers=ADMIN)
    )
    await asyncio.wait({erase}, timeout=1.0)
    await h.relay()  # whatever the erasure committed meanwhile goes out now
    pause.release.set()
    await task
    assert (await erase).status_code == 202


async def count(h: Harness, sql: str, **params: Any) -> int:
    async with h.segmenter.platform.unit_of_work() as uow:
        return int((await uow.session.execute(text(sql), params)).scalar_one())


async def test_a_backfill_chunk_in_flight_leaves_no_membership_of_an_erased_customer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(
            uow,
            [
                make_event("m1", "identify", user_id="u1", traits={"plan": "pro", "email": "a@example.com"}),
                make_event("m2", "identify", user_id="u2", traits={"plan": "pro"}),
            ],
        )
    r = await h.client.post(
        "/v1/segments",
        json={"name": "Pro", "definition": {"trait": "plan", "op": "equals", "value": "pro"}},
        headers=ADMIN,
    )
    sid = r.json()["id"]
    # Held after the chunk's statement wrote both memberships and their announcements, before commit.
    pause = Pause(monkeypatch, segment_store, "advance_backfill", after=True)
    await erase_while_paused(h, pause, h.segmenter.backfill.run_until_idle(), "u1")

    assert await count(h, "SELECT count(*) FROM memberships WHERE customer_id = 'u1'") == 0
    assert await count(h, "SELECT count(*) FROM memberships WHERE is_member AND segment_id = :s", s=sid) == 1
    members = (await h.client.get(f"/v1/segments/{sid}/members", headers=ADMIN)).json()["members"]
    assert members == ["u2"]


async def test_a_recommendations_recompute_in_flight_stores_no_lists_of_an_erased_customer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    camera = {"product_id": "cam", "name": "Camera", "category": "Cameras", "price": 300}
    card = {"product_id": "card", "name": "Card", "category": "Accessories", "price": 20}
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(
            uow,
            [
                make_event(
                    f"o{u}", user_id=u, event="Order Completed", properties={"products": [camera, card]}
                )
                for u in ("u1", "u2")
            ],
        )
    recommendations = h.segmenter.recommendations
    # Held after the chunk read the customer ids, before it stores their lists.
    pause = Pause(monkeypatch, catalogue_store, "save_recommendations", after=False)
    await erase_while_paused(h, pause, recommendations.recompute(), "u1")

    assert await count(h, "SELECT count(*) FROM customer_recommendations WHERE customer_id = 'u1'") == 0
    assert await count(h, "SELECT count(*) FROM customer_recommendations WHERE customer_id = 'u2'") == 1


async def test_a_republish_in_flight_never_announces_an_erased_profile_after_its_erasure(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(
            uow, [make_event("m1", "identify", user_id="u1", traits={"email": "a@example.com"})]
        )
    # Held after the chunk wrote its snapshots to the outbox, before commit.
    pause = Pause(monkeypatch, profile_store, "snapshot_chunk", after=True)
    job = await h.segmenter.republisher.start()
    assert job is not None
    await erase_while_paused(h, pause, h.segmenter.republisher.wait(), "u1")
    assert job.error is None
    await h.relay()

    profiles = await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=8)
    kinds = [m["value"]["kind"] for m in profiles if m["value"]["customer_id"] == "u1"]
    # The erasure is the last word: projections that follow the topic drop the profile for good.
    assert kinds[-1] == "erased" and "snapshot" in kinds, kinds
