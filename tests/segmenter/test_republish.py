"""Re-announcing every profile (`kind=snapshot`) for a consumer to rebuild its projection from."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.segmenter.store import profiles as profile_store
from shared.contracts.events import RESYNC_CAUSE, ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PROFILES, SEGMENT_MEMBERSHIP
from tests.segmenter.conftest import ADMIN, Harness, make_event
from tests.segmenter.test_erasure_races import Pause
from tests.support import eventually, read_topic


async def snapshots(h: Harness, job_id: str, n: int) -> list[ProfileChanged]:
    await h.relay()
    messages = await read_topic(
        h.settings.topic(PROFILES.name),
        until=lambda ms: sum(job_id in m["value"]["event_id"] for m in ms) >= n,
        timeout=10,
    )
    return [ProfileChanged.model_validate(m["value"]) for m in messages if job_id in m["value"]["event_id"]]


async def test_every_profile_is_announced_as_it_is(harness: Harness) -> None:
    await harness.send(
        make_event("m1", "page", anonymous_id="anon-1", name="Home"),
        make_event("m2", "identify", user_id="u1", anonymous_id="anon-1", traits={"email": "a@example.com"}),
        make_event("m3", "identify", user_id="u2", traits={"plan": "pro"}),
        make_event("m4", "track", user_id="u3", event="Signed In"),
    )
    await harness.processed(4)
    pro = await harness.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    harness.segmenter.republisher.chunk = 2  # several chunks
    started = await harness.client.post("/v1/admin/republish-profiles", headers=ADMIN)
    assert started.status_code == 202, started.text
    job: dict[str, Any] = started.json()
    assert job["customers_total"] == 3

    async def done() -> dict[str, Any] | None:
        body: dict[str, Any] = (
            await harness.client.get("/v1/admin/republish-profiles", headers=ADMIN)
        ).json()
        return body if body["status"] == "done" else None

    finished = await eventually(done, timeout=15)
    assert finished["customers_done"] == 3
    got = {p.customer_id: p for p in await snapshots(harness, job["job_id"], 3)}
    assert set(got) == {"anon-1", "u2", "u3"}
    assert all(p.kind is ProfileChangeKind.SNAPSHOT for p in got.values())
    assert got["anon-1"].identities == {"anonymous_id": ["anon-1"], "user_id": ["u1"]}
    assert got["anon-1"].traits == {"email": "a@example.com"} and got["u2"].traits == {"plan": "pro"}
    assert got["u3"].lifecycle_stage is not None
    assert finished["memberships_announced"] == 1
    resynced = [
        m["value"]
        for m in await read_topic(
            harness.settings.topic(SEGMENT_MEMBERSHIP.name),
            until=lambda ms: any(job["job_id"] in m["value"]["event_id"] for m in ms),
            timeout=10,
        )
        if job["job_id"] in m["value"]["event_id"]
    ]
    assert [(m["customer_id"], m["segment_id"], m["change"], m["cause"]) for m in resynced] == [
        ("u2", pro, "entered", RESYNC_CAUSE)
    ]

    # A second job announces again, under new event ids (consumers would drop a repeat of the first).
    again = (await harness.client.post("/v1/admin/republish-profiles", headers=ADMIN)).json()
    await eventually(done, timeout=15)
    second = await snapshots(harness, again["job_id"], 3)
    assert len(second) == 3 and not {p.event_id for p in second} & {p.event_id for p in got.values()}
    assert (await harness.client.post("/v1/admin/republish-profiles")).status_code == 401


async def test_a_chunk_resyncs_the_memberships_of_the_customers_it_holds_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A customer created within a chunk's id range after the chunk locked its customers is not the
    chunk's: resyncing its memberships would read them without holding it (a change of theirs
    committing before the chunk would then go out before the older state the chunk announced)."""
    h = harness
    pro = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    for mid, user in (("m1", "a0"), ("m2", "c0")):
        await h.segmenter.events.handle_in_own_unit(
            [make_event(mid, "identify", user_id=user, traits={"plan": "pro"})]
        )
    pause = Pause(monkeypatch, profile_store, "snapshot_chunk", after=True)
    job = await h.segmenter.republisher.start()
    assert job is not None
    await asyncio.wait_for(pause.reached.wait(), 10)  # a0 and c0 held and snapshotted
    await h.segmenter.events.handle_in_own_unit(
        [make_event("m3", "identify", user_id="b0", traits={"plan": "pro"})]
    )
    pause.release.set()
    await h.segmenter.republisher.wait()
    assert job.error is None and job.done == 2 and job.memberships == 2
    await h.relay()
    resynced = [
        (m["value"]["customer_id"], m["value"]["segment_id"])
        for m in await read_topic(h.settings.topic(SEGMENT_MEMBERSHIP.name), idle=0.5, timeout=10)
        if job.job_id in m["value"]["event_id"]
    ]
    assert sorted(resynced) == [("a0", pro), ("c0", pro)]
