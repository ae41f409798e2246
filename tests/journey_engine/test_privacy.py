"""clm.privacy.v1 in the journey engine: export and erase a customer (projection, instances, timers,
message log), confirm on the topic, and start no journey for their later events, memberships, profile
changes or broadcasts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from services.journey_engine.consumers.privacy import drop_erased_events
from shared.contracts.events import CustomerEvent, PrivacyAction, PrivacyRequest
from shared.contracts.topics import PRIVACY
from shared.privacy import add_tombstones
from tests.journey_engine.harness import ADMIN, Harness, engine_running
from tests.journey_engine.test_broadcasts import RUN_AT, add_members, broadcast, entered
from tests.journey_engine.test_entry import SEND_AND_WAIT, segment_journey
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import read_topic


async def ask(h: Harness, action: PrivacyAction, request_id: str) -> dict[str, Any]:
    """Publish a request as the segmenter does and return the engine's answer to it."""
    msg = PrivacyRequest(
        event_id=f"{request_id}:segmenter:{action.value}",
        request_id=request_id,
        action=action,
        customer_id="c1",
        identities=["c1", "u1", "ann@example.com"],
        service="segmenter",
        occurred_at=datetime.now(UTC),
    )
    await h.platform.producer.publish(PRIVACY.name, "c1", msg)
    await h.platform.producer.publish(PRIVACY.name, "c1", msg)  # redelivered: answered once
    msgs = await read_topic(
        h.settings.topic(PRIVACY.name),
        until=lambda ms: any(m["value"]["event_id"].startswith(f"{request_id}:journey_engine:") for m in ms),
        timeout=20,
    )
    msgs = await read_topic(h.settings.topic(PRIVACY.name), idle=0.5, timeout=8)
    mine = [
        m["value"]
        for m in msgs
        if m["value"]["request_id"] == request_id and m["value"]["service"] != "segmenter"
    ]
    assert len(mine) == 1 and mine[0]["event_id"] == f"{request_id}:journey_engine:{mine[0]['action']}"
    return mine[0]


async def count(h: Harness, table: str, customer_id: str = "c1") -> int:
    n: int = await h.scalar(f"SELECT count(*) FROM {table} WHERE customer_id = :c", c=customer_id)
    return n


async def test_export_then_erase_then_later_events_start_nothing(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        jid = await h.journey(linear("Welcome", "Signed Up", SEND_AND_WAIT))
        await h.profile("c1", {"email": "ann@example.com"}, identities={"user_id": ["u1"]})
        await h.membership("c1", "vip")
        await h.track("u1", "Signed Up")
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("c1", "active")]
        assert len(await h.requests(until=lambda m: len(m) >= 1)) == 1
        # A timer parked with its error (which may quote the customer's data) goes with the customer.
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO timers_parked (id, instance_id, seq, due_at, parked_at, attempts, error) "
                    "SELECT 1, id, seq, now(), now(), 3, 'ValueError: ann@example.com' FROM instances"
                )
            )

        part = await ask(h, PrivacyAction.EXPORT_REQUESTED, f"export-{uuid.uuid4().hex}")
        assert part["action"] == "export_part"
        data = part["data"]
        assert [i["journey_id"] for i in data["instances"]] == [jid]
        assert data["customers"][0]["email"] == "ann@example.com"
        assert [m["template_id"] for m in data["message_log"]] == ["hello"]
        assert [s["segment_id"] for s in data["segment_members"]] == ["vip"]
        assert len(data["timers"]) == 1
        assert [t["error"] for t in data["timers_parked"]] == ["ValueError: ann@example.com"]

        done = await ask(h, PrivacyAction.ERASE_REQUESTED, f"erase-{uuid.uuid4().hex}")
        assert done["action"] == "erase_completed" and done["data"]["deleted"]["instances"] == 1
        for table in ("instances", "enrolments", "message_log", "segment_members", "customers"):
            assert await count(h, table) == 0, table
        assert await h.scalar("SELECT count(*) FROM customer_identities") == 0
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        assert await h.scalar("SELECT count(*) FROM timers_parked") == 0
        assert done["data"]["deleted"]["timers_parked"] == 1
        assert await h.scalar("SELECT count(*) FROM erasure_tombstones") == 3

        await h.track("u1", "Signed Up")
        assert await h.instances(jid) == []
        assert len(await h.requests(idle=1.0)) == 1
        await h.track("u2", "Signed Up")  # someone else still enters
        assert [r.customer_id for r in await h.instances(jid)] == ["u2"]

        audit = (await h.client.get("/v1/audit", headers=ADMIN, params={"method": "POST"})).json()
        assert [e["path"] for e in audit["entries"]] == [f"/v1/journeys/{jid}/activate", "/v1/journeys"]


async def test_an_alias_from_an_erased_id_is_dropped_like_its_other_events(make_settings: Any) -> None:
    """alias(previousId=<erased anonymousId>, userId=<new>) carries the erased id only as previousId:
    it is an event of the erased person all the same."""
    async with engine_running(make_settings) as h:
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as uow:
            await add_tombstones(uow.session, salt, ["a1"], "erase-1", h.clock.now())
        now = h.clock.now()

        def event(mid: str, type: str, **ids: str) -> CustomerEvent:
            extra = {"event": "Signed Up"} if type == "track" else {}
            return CustomerEvent(message_id=mid, type=type, timestamp=now, received_at=now, **extra, **ids)

        items = [
            ("e1", event("e1", "alias", previous_id="a1", user_id="u-new")),
            ("e2", event("e2", "track", anonymous_id="a1")),
            ("e3", event("e3", "alias", previous_id="a2", user_id="u2")),
            ("e4", event("e4", "track", user_id="u-new")),
        ]
        async with h.platform.unit_of_work() as uow:
            kept, _ = await drop_erased_events(uow, salt, items)
        assert [eid for eid, _ in kept] == ["e3", "e4"]


async def residue(h: Harness, customer_id: str = "c1") -> dict[str, int]:
    tables = (
        "instances",
        "enrolments",
        "message_log",
        "goal_windows",
        "segment_members",
        "customer_recommendations",
        "customers",
        "customer_identities",
    )
    return {t: await count(h, t, customer_id) for t in tables if await count(h, t, customer_id)}


async def test_a_membership_announced_before_the_erasure_and_read_after_it_enters_nothing(
    make_settings: Any,
) -> None:
    """The segmenter announced c1 entering a segment, then erased c1; the engine handles the privacy
    request first and the membership late: c1 stays erased (no instance, no message, and no
    membership that would put them in every later broadcast)."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(segment_journey())
        await h.profile("c1", {"email": "ann@example.com"}, identities={"user_id": ["u1"]})
        done = await ask(h, PrivacyAction.ERASE_REQUESTED, f"erase-{uuid.uuid4().hex}")
        assert done["action"] == "erase_completed"

        await h.membership("c1", "high-value")
        await h.membership("c2", "high-value")  # someone else in the same batch's place still enters
        assert [r.customer_id for r in await h.instances(jid)] == ["c2"]
        assert await residue(h) == {}
        requests = await h.requests(until=lambda m: len(m) >= 1)
        assert [m["customer_id"] for m in requests] == ["c2"]


async def test_an_erased_announcement_deletes_the_customer_and_later_changes_bring_nothing_back(
    make_settings: Any,
) -> None:
    """The segmenter's `erased` announcement (read before or after its privacy request) deletes what
    the engine holds on the customer, as the privacy erasure does; a stage change or membership
    announced before it and read after it recreates neither the profile nor an instance."""
    async with engine_running(make_settings) as h:
        j = linear("Stage", "unused", SEND_AND_WAIT)
        j["entry"] = {"type": "lifecycle_stage", "to_stage": "at_risk"}
        jid = await h.journey(j)
        segment = await h.journey(segment_journey())
        await h.profile("c1", {"email": "ann@example.com"}, identities={"user_id": ["u1"]})
        await h.membership("c1", "vip")
        await h.profile(
            "c1", {"email": "ann@example.com"}, kind="stage_changed", stage="at_risk", previous="active"
        )
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("c1", "active")]
        assert len(await h.requests(until=lambda m: len(m) >= 1)) == 1
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO customer_recommendations (customer_id, lists, updated_at) "
                    "VALUES ('c1', '{\"top\": [\"sku-1\"]}', now())"
                )
            )
        assert set(await residue(h)) >= {"instances", "enrolments", "message_log", "customers"}

        await h.profile("c1", {}, kind="erased")
        assert await h.instances(jid) == []
        assert await residue(h) == {}
        assert await h.scalar("SELECT count(*) FROM timers") == 0
        # Read late: a stage change and a membership the segmenter announced before the erasure.
        await h.profile(
            "c1", {"email": "ann@example.com"}, kind="stage_changed", stage="at_risk", previous="active"
        )
        await h.membership("c1", "high-value")
        assert await h.instances(jid) == [] and await h.instances(segment) == []
        assert await residue(h) == {}
        # Before the privacy request is read, an event under the person's userId is theirs still.
        welcome = await h.journey(linear("Welcome", "Signed Up", SEND_AND_WAIT))
        await h.track("u1", "Signed Up")
        assert await h.instances(welcome) == []
        assert len(await h.requests(idle=1.0)) == 1  # the one sent before the erasure


async def test_privacy_erase_and_export_cover_the_recommendation_lists(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.profile("c1", {"email": "ann@example.com"}, identities={"user_id": ["u1"]})
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO customer_recommendations (customer_id, lists, updated_at) "
                    "VALUES ('c1', '{\"top\": [\"sku-1\"]}', now())"
                )
            )
        part = await ask(h, PrivacyAction.EXPORT_REQUESTED, f"export-{uuid.uuid4().hex}")
        assert [r["lists"] for r in part["data"]["customer_recommendations"]] == [{"top": ["sku-1"]}]
        done = await ask(h, PrivacyAction.ERASE_REQUESTED, f"erase-{uuid.uuid4().hex}")
        assert done["data"]["deleted"]["customer_recommendations"] == 1
        assert await residue(h) == {}


async def test_a_broadcast_chunk_enrols_no_erased_member(make_settings: Any) -> None:
    """A member erased before the run (a membership row left from before) is skipped; one erased while
    the chunk is due waits for the erasure's gate, then is not read."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)  # m00001..m00003
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as uow:
            await add_tombstones(uow.session, salt, ["m00001"], "erase-1", h.clock.now())
        r = await h.client.post(
            "/v1/journeys", headers=ADMIN, json={"id": "weekly", "definition": broadcast("everyone")}
        )
        assert r.status_code == 201, r.text
        assert (await h.client.post("/v1/journeys/weekly/activate", headers=ADMIN)).status_code == 200
        h.clock.set(RUN_AT)

        erasure = await h.platform.engine.connect()
        try:
            # m00002's erasure holds the gate exclusive, as the privacy consumer does.
            await erasure.execute(
                text("SELECT pg_advisory_xact_lock(hashtext('clm.erasure.' || current_schema()))")
            )
            await erasure.execute(text("DELETE FROM segment_members WHERE customer_id = 'm00002'"))
            running = asyncio.create_task(h.fire_due())
            await asyncio.sleep(0.5)
            assert not running.done()  # the chunk waits for the erasure
            await erasure.commit()
            await asyncio.wait_for(running, 20)
        finally:
            await erasure.close()
        assert await entered(h, "weekly") == [("m00003", 1)]


async def test_an_event_taken_before_its_customer_was_erased_enters_nothing(make_settings: Any) -> None:
    """The consumer drops events of erased identities before it takes their customers' locks; an
    `erased` announcement (which tombstones the customer id) committing while the batch waited for
    the lock is seen under the lock: the batch enters no one. Called as the consumer calls it after
    its own check, with the tombstone committed in between."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(linear("Welcome", "Signed Up", SEND_AND_WAIT))
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as uow:
            await add_tombstones(uow.session, salt, ["c-gone"], "erase-1", h.clock.now())
        now = h.clock.now()

        def signed_up(mid: str, user_id: str) -> tuple[str, CustomerEvent]:
            event = CustomerEvent(
                message_id=mid,
                type="track",
                event="Signed Up",
                user_id=user_id,
                timestamp=now,
                received_at=now,
            )
            return mid, event

        async with h.platform.unit_of_work() as uow:
            await h.engine.on_events(uow, [signed_up("e1", "c-gone"), signed_up("e2", "c-here")])
        assert [r.customer_id for r in await h.instances(jid)] == ["c-here"]
