"""Identity resolution end to end: anonymous then identified, alias of two known ids, lookups."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from shared.contracts.events import ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PROFILES
from tests.segmenter.conftest import ADMIN, START, Harness, make_event, segmenter_running
from tests.support import eventually, read_topic


async def test_anonymous_browsing_then_identify_is_one_profile(harness: Harness) -> None:
    await harness.send(
        make_event("m1", "page", anonymous_id="anon-1", name="Home"),
        make_event("m2", "track", anonymous_id="anon-1", event="Product Viewed", properties={"sku": "A"}),
    )
    await harness.processed(2)
    await harness.send(
        make_event(
            "m3",
            "identify",
            user_id="u1",
            anonymous_id="anon-1",
            traits={"email": "a@example.com"},
            timestamp=START + timedelta(minutes=5),
        ),
        make_event(
            "m4",
            "track",
            user_id="u1",
            event="Order Completed",
            properties={"revenue": 42.5},
            timestamp=START + timedelta(minutes=6),
        ),
    )
    await harness.processed(4)
    by_user = await harness.customer("u1")
    by_anon = await harness.customer("anon-1")
    by_email = await harness.customer("a@example.com")
    assert by_user["customer_id"] == by_anon["customer_id"] == by_email["customer_id"] == "anon-1"
    assert by_user["identities"] == {"anonymous_id": ["anon-1"], "user_id": ["u1"]}
    assert by_user["traits"] == {"email": "a@example.com"}
    assert by_user["aggregates"]["event_count"] == 4
    assert by_user["aggregates"]["events"]["Product Viewed"]["count"] == 1
    assert by_user["commerce"]["orders_count"] == 1 and by_user["commerce"]["revenue"] == 42.5
    timeline = (
        await harness.client.get(
            "/v1/customers/u1/events?limit=3", headers={"Authorization": "Bearer test-admin-token"}
        )
    ).json()
    assert [e["message_id"] for e in timeline["events"]] == ["m4", "m3", "m2"]
    rest = await harness.client.get(
        f"/v1/customers/u1/events?limit=3&before={timeline['next_before']}",
        headers={"Authorization": "Bearer test-admin-token"},
    )
    assert [e["message_id"] for e in rest.json()["events"]] == ["m1"]


async def test_a_new_identifier_is_announced_so_others_resolve_it(harness: Harness) -> None:
    """A visitor known by their anonymousId logs in without traits: no trait changed, yet the notifier
    and the journey engine must learn that the userId is this customer (`identity_linked`). Events
    that add no identifier announce nothing."""
    await harness.send(make_event("m1", "page", anonymous_id="anon-7", name="Home"))
    await harness.processed(1)
    await harness.send(
        make_event("m2", "track", user_id="u7", anonymous_id="anon-7", event="Signed In"),
        make_event("m3", "track", user_id="u7", anonymous_id="anon-7", event="Product Viewed"),
    )
    await harness.processed(3)
    await harness.relay()
    profiles = [
        m["value"]
        for m in await read_topic(
            harness.settings.topic(PROFILES.name),
            until=lambda ms: any(m["value"]["kind"] == "identity_linked" for m in ms),
            idle=1.5,
            timeout=8,
        )
    ]
    about_identity = [p for p in profiles if p["kind"] != "stage_changed"]  # the lifecycle's own
    assert [(p["customer_id"], p["kind"]) for p in about_identity] == [("anon-7", "identity_linked")]
    linked = about_identity[0]
    assert linked["identities"] == {"anonymous_id": ["anon-7"], "user_id": ["u7"]}
    # m2 links u7; m3, in the same batch or the next, adds nothing. Announced once either way, caused
    # by the batch's last event of the customer (one batch) or by m2 (two batches).
    assert linked["caused_by"] in ("m2", "m3") and linked["changed_traits"] == []


async def test_second_device_then_login_merges_into_the_known_profile(harness: Harness) -> None:
    await harness.send(make_event("m1", "identify", user_id="u1", anonymous_id="a1", traits={"plan": "pro"}))
    await harness.processed(1)
    await harness.send(
        make_event(
            "m2", "track", anonymous_id="a2", event="Signed In", timestamp=START + timedelta(minutes=1)
        )
    )
    await harness.processed(2)
    assert (await harness.customer("a2"))["customer_id"] == "a2"  # a separate anonymous profile so far
    await harness.send(
        make_event(
            "m3",
            "identify",
            user_id="u1",
            anonymous_id="a2",
            traits={"name": "Ann"},
            timestamp=START + timedelta(minutes=2),
        )
    )
    await harness.processed(3)
    p = await harness.customer("a2")
    assert p["customer_id"] == "u1"
    assert p["traits"] == {"plan": "pro", "name": "Ann"}
    assert p["aggregates"]["events"]["Signed In"]["count"] == 1
    assert p["merges"][0]["merged_id"] == "a2"
    assert p["merges"][0]["cause"]["message_id"] == "m3"
    await harness.relay()
    profiles = await read_topic(
        harness.settings.topic(PROFILES.name),
        until=lambda ms: any(m["value"]["kind"] == "identity_merged" for m in ms),
        timeout=8,
    )
    merged = next(m["value"] for m in profiles if m["value"]["kind"] == "identity_merged")
    assert merged["customer_id"] == "u1" and merged["merged_ids"] == ["a2"]
    assert merged["traits"] == {"plan": "pro", "name": "Ann"}
    assert merged["identities"]["anonymous_id"] == ["a1", "a2"]


async def test_a_trait_update_naming_its_customer_lands_on_that_profile(harness: Harness) -> None:
    """A journey's `update_trait` step names the canonical id, here a visitor's anonymousId (the
    profile's id since they browsed before signing up); also after that profile was merged away."""
    await harness.send(
        make_event("m1", "page", anonymous_id="a9", name="Home"),
        make_event("m2", "identify", user_id="u9", anonymous_id="a9", traits={"plan": "pro"}),
    )
    await harness.processed(2)
    await harness.send(
        make_event(
            "j1",
            "identify",
            user_id="a9",
            customer_id="a9",
            traits={"cart_reminded": True},
            source="journey_engine",
            timestamp=START + timedelta(minutes=1),
        )
    )
    await harness.processed(3)
    p = await harness.customer("u9")
    assert p["customer_id"] == "a9"
    assert p["traits"] == {"plan": "pro", "cart_reminded": True}
    assert p["identities"] == {"anonymous_id": ["a9"], "user_id": ["u9"]}
    assert (
        await harness.client.get(
            "/v1/customers/user:a9", headers={"Authorization": "Bearer test-admin-token"}
        )
    ).status_code == 404
    # a9 merges into another known user's profile by alias; a late update naming a9 follows it.
    await harness.send(
        make_event("m3", "identify", user_id="u10", traits={"city": "Oslo"}),
        make_event("m4", "alias", user_id="u10", previous_id="u9", timestamp=START + timedelta(minutes=2)),
    )
    await harness.processed(5)
    await harness.send(
        make_event(
            "j2",
            "identify",
            user_id="a9",
            customer_id="a9",
            traits={"winback": True},
            source="journey_engine",
            timestamp=START + timedelta(minutes=3),
        )
    )
    await harness.processed(6)
    p = await harness.customer("u10")
    assert p["customer_id"] == "u10" and p["traits"]["winback"] is True
    assert p["traits"]["cart_reminded"] is True and p["aggregates"]["event_count"] == 6


async def test_alias_merges_two_known_users_and_later_events_land_on_the_survivor(harness: Harness) -> None:
    await harness.send(
        make_event("m1", "identify", user_id="old-id", traits={"plan": "free", "city": "Oslo"}),
        make_event(
            "m2", "identify", user_id="new-id", traits={"plan": "pro"}, timestamp=START + timedelta(seconds=1)
        ),
    )
    await harness.processed(2)
    # Two known users are not merged by a shared anonymous id, only by an alias.
    await harness.send(
        make_event(
            "m3", "alias", user_id="new-id", previous_id="old-id", timestamp=START + timedelta(seconds=2)
        )
    )
    await harness.send(
        make_event("m4", "track", user_id="old-id", event="Clicked", timestamp=START + timedelta(seconds=3))
    )
    await harness.processed(4)
    p = await harness.customer("old-id")
    assert p["customer_id"] == "new-id"
    assert p["traits"] == {"plan": "pro", "city": "Oslo"}
    assert p["aggregates"]["events"]["Clicked"]["count"] == 1
    assert p["identities"]["user_id"] == ["new-id", "old-id"]
    assert p["merges"][0]["cause"]["event_type"] == "alias"
    assert {"kind": "user", "value": "old-id"} in p["merges"][0]["cause"]["identifiers"]


async def test_concurrent_units_resolving_the_same_identifiers_never_split_a_customer(
    harness: Harness,
) -> None:
    # Two units of work (as two partitions or two replicas) see a1 as unknown at the same time.
    handler = harness.segmenter.events
    first = [make_event("c1", "track", anonymous_id="a1", event="Viewed")]
    second = [make_event("c2", "identify", user_id="u9", anonymous_id="a1", traits={"plan": "pro"})]
    await asyncio.gather(handler.handle_in_own_unit(first), handler.handle_in_own_unit(second))
    p = await harness.customer("a1")
    assert p == await harness.customer("u9")
    assert p["identities"] == {"anonymous_id": ["a1"], "user_id": ["u9"]}
    assert p["aggregates"]["event_count"] == 2 and p["traits"] == {"plan": "pro"}


async def test_device_traits_from_context_fill_the_profile_and_are_announced(harness: Harness) -> None:
    device = {"timezone": "Europe/Oslo", "locale": "nb-NO", "device": {"token": "fcm-1"}}
    await harness.send(make_event("c1", "page", anonymous_id="anon-d", name="Home", context=device))
    await harness.processed(1)
    profile = await harness.customer("anon-d")
    assert profile["traits"] == {"timezone": "Europe/Oslo", "locale": "nb-NO", "push_token": "fcm-1"}
    # An identify's own value replaces the device's; later device values change nothing.
    await harness.send(
        make_event(
            "c2",
            "identify",
            anonymous_id="anon-d",
            traits={"timezone": "Asia/Tokyo"},
            timestamp=START + timedelta(minutes=1),
        ),
        make_event(
            "c3",
            "track",
            anonymous_id="anon-d",
            event="Signed In",
            context={**device, "timezone": "Europe/Paris"},
            timestamp=START + timedelta(minutes=2),
        ),
    )
    await harness.processed(3)
    assert (await harness.customer("anon-d"))["traits"]["timezone"] == "Asia/Tokyo"
    await harness.relay()
    profiles = await read_topic(
        harness.settings.topic(PROFILES.name),
        until=lambda ms: sum(m["value"]["kind"] == "traits_changed" for m in ms) >= 2,
        timeout=8,
    )
    changed = [m["value"]["changed_traits"] for m in profiles if m["value"]["kind"] == "traits_changed"]
    assert changed == [["locale", "push_token", "timezone"], ["timezone"]]


async def test_a_new_customer_never_takes_the_id_of_an_existing_one(harness: Harness) -> None:
    """Customers `7` (anonymousId 7), `user:7` (userId "user:7") and `user:7:2` (anonymousId
    "user:7:2") exist: a new userId 7 is someone else, with a profile of its own."""
    handler = harness.segmenter.events
    await handler.handle_in_own_unit([make_event("a", anonymous_id="7", event="Viewed")])
    await handler.handle_in_own_unit([make_event("b", "identify", user_id="user:7", traits={"name": "B"})])
    await handler.handle_in_own_unit([make_event("c", anonymous_id="user:7:2", event="Viewed")])
    await handler.handle_in_own_unit([make_event("d", "identify", user_id="7", traits={"name": "D"})])
    d = await harness.customer("7")  # the customer whose id is 7 (the anonymous one) comes first
    assert d["customer_id"] == "7" and d["identities"] == {"anonymous_id": ["7"]}
    assert (await harness.customer("user:7"))["traits"] == {"name": "B"}
    new = await harness.customer("user:7:3")
    assert new["traits"] == {"name": "D"} and new["identities"] == {"user_id": ["7"]}


async def test_a_customer_id_created_meanwhile_is_a_conflict_the_unit_retries(harness: Harness) -> None:
    # As a concurrent unit that committed customer `x` between our lookup and our insert: linking to
    # it would fold our events into its profile. The handler retries such a unit from the lookup.
    from services.segmenter.conflicts import is_transient_conflict

    await harness.segmenter.events.handle_in_own_unit([make_event("a", anonymous_id="x", event="V")])
    with pytest.raises(profile_store.CustomerIdTaken) as taken:
        async with harness.segmenter.platform.unit_of_work() as uow:
            await profile_store.insert_customers_and_links(
                uow.session, ["x"], [("user", "x", "x")], harness.clock.now()
            )
    assert is_transient_conflict(taken.value)
    # A deadlock between two units raised straight by asyncpg (the batch's statements skip
    # SQLAlchemy) is retried in the unit too: it was a handler error, the batch split by halves.
    import asyncpg

    assert is_transient_conflict(asyncpg.exceptions.DeadlockDetectedError("deadlock detected"))
    assert not is_transient_conflict(asyncpg.exceptions.UniqueViolationError("duplicate key"))


async def test_a_numbered_id_of_a_merged_away_customer_is_not_given_out_again(harness: Harness) -> None:
    handler = harness.segmenter.events
    await handler.handle_in_own_unit([make_event("a", anonymous_id="7", event="Viewed")])
    await handler.handle_in_own_unit([make_event("b", "identify", user_id="user:7", traits={"name": "B"})])
    await handler.handle_in_own_unit([make_event("c", anonymous_id="user:7:2", event="Viewed")])
    await handler.handle_in_own_unit([make_event("d", "identify", user_id="u99", traits={"name": "U"})])
    # The visitor user:7:2 logs in as u99: their profile is merged away, its id retired.
    await handler.handle_in_own_unit([make_event("e", "identify", user_id="u99", anonymous_id="user:7:2")])
    assert (await harness.customer("user:7:2"))["customer_id"] == "u99"
    await handler.handle_in_own_unit([make_event("f", "identify", user_id="7", traits={"name": "F"})])
    new = await harness.customer("user:7:3")
    assert new["traits"] == {"name": "F"} and new["identities"] == {"user_id": ["7"]}


async def test_the_timeline_pages_through_events_before_1970(harness: Harness) -> None:
    """A cursor of an event before the epoch is negative (`-123-7`): it pages like any other."""
    early = datetime(1969, 12, 31, 23, 0, tzinfo=UTC)
    await harness.segmenter.events.handle_in_own_unit(
        [
            make_event(f"m{i}", anonymous_id="old", event="Viewed", timestamp=early - timedelta(days=i))
            for i in range(3)
        ]
    )
    seen, before = [], None
    while True:
        params = {"limit": 1, **({"before": before} if before else {})}
        r = await harness.client.get("/v1/customers/old/events", params=params, headers=ADMIN)
        assert r.status_code == 200, r.text
        seen += [e["message_id"] for e in r.json()["events"]]
        before = r.json()["next_before"]
        if before is None:
            break
        assert before.startswith("-")
    assert seen == ["m0", "m1", "m2"]
    for bad in ("--7", "12-", "x-1", "5-" + "9" * 30):
        r = await harness.client.get("/v1/customers/old/events", params={"before": bad}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "before", bad


async def test_a_merged_away_id_is_never_given_to_a_new_customer(harness: Harness) -> None:
    await harness.send(
        make_event("m1", "page", anonymous_id="a5", name="Home"),
        make_event("m2", "identify", user_id="u5", traits={"plan": "pro"}),
    )
    await harness.processed(2)
    await harness.send(
        make_event("m3", "identify", user_id="u5", anonymous_id="a5", timestamp=START + timedelta(minutes=1))
    )
    await harness.processed(3)
    assert (await harness.customer("a5"))["customer_id"] == "u5"  # a5 was merged into u5
    # Someone else whose userId happens to be "a5": a new customer, not under the retired id.
    await harness.send(make_event("m4", "identify", user_id="a5", traits={"plan": "free"}))
    await harness.processed(4)
    async with harness.segmenter.platform.engine.connect() as conn:
        ids = sorted(r[0] for r in await conn.execute(text("SELECT customer_id FROM customers")))
    assert ids == ["u5", "user:a5"]


@pytest.fixture
async def small_parts(make_settings: Callable[..., SegmenterSettings]) -> AsyncIterator[Harness]:
    """A segmenter announcing at most 3 identities per profile change."""
    async with segmenter_running(make_settings, profile_identities_per_message=3) as h:
        yield h


async def test_a_large_identity_set_is_announced_in_parts_that_together_name_every_identity(
    small_parts: Harness,
) -> None:
    """One customer seen under many anonymous ids (a kiosk, a crawler) would make each profile change
    carry them all, past Kafka's limit, and be parked: the change goes out in parts, each with the
    current traits, the first with what changed, together naming every identity; so does a snapshot."""
    h = small_parts
    anons = [f"anon-{i}" for i in range(7)]
    await h.send(
        *(
            make_event(f"i{i}", "identify", user_id="u1", anonymous_id=a, traits={"n": i})
            for i, a in enumerate(anons)
        )
    )
    await h.processed(len(anons))
    await h.relay()
    changes = [
        ProfileChanged.model_validate(m["value"])
        for m in await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=8)
    ]
    assert len({c.event_id for c in changes}) == len(changes)
    assert all(sum(map(len, c.identities.values())) <= 3 for c in changes)
    last = [c for c in changes if c.caused_by == "i6" and c.kind is not ProfileChangeKind.STAGE_CHANGED]
    assert len(last) == 3  # 8 identities (a userId, 7 anonymousIds) in parts of 3
    assert last[0].kind is ProfileChangeKind.TRAITS_CHANGED and last[0].changed_traits == ["n"]
    assert all(c.kind is ProfileChangeKind.IDENTITY_LINKED and not c.changed_traits for c in last[1:])
    assert all(c.traits == {"n": 6} for c in last)
    named = {(label, v) for c in last for label, values in c.identities.items() for v in values}
    assert named == {("user_id", "u1"), *(("anonymous_id", a) for a in anons)}
    assert (await h.customer("u1"))["identities"]["anonymous_id"] == sorted(anons)

    # A trait change that links nothing new: the first part only (consumers keep the identities
    # they were given), not the whole set again.
    await h.send(make_event("t1", "identify", user_id="u1", traits={"n": 7}))
    await h.processed(len(anons) + 1)
    await h.relay()
    changes = [
        ProfileChanged.model_validate(m["value"])
        for m in await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=8)
    ]
    [traits_only] = [
        c for c in changes if c.caused_by == "t1" and c.kind is not ProfileChangeKind.STAGE_CHANGED
    ]
    assert traits_only.kind is ProfileChangeKind.TRAITS_CHANGED and traits_only.traits == {"n": 7}
    assert sum(map(len, traits_only.identities.values())) == 3

    started = (await h.client.post("/v1/admin/republish-profiles", headers=ADMIN)).json()

    async def done() -> bool:
        body = (await h.client.get("/v1/admin/republish-profiles", headers=ADMIN)).json()
        return bool(body["status"] == "done")

    await eventually(done, timeout=15)
    await h.relay()
    snapshot = [
        ProfileChanged.model_validate(m["value"])
        for m in await read_topic(h.settings.topic(PROFILES.name), idle=0.5, timeout=8)
        if started["job_id"] in m["value"]["event_id"]
    ]
    assert len(snapshot) == 3 and len({c.event_id for c in snapshot}) == 3
    assert all(c.kind is ProfileChangeKind.SNAPSHOT and c.traits == {"n": 7} for c in snapshot)
    assert all(sum(map(len, c.identities.values())) <= 3 for c in snapshot)
    assert {(label, v) for c in snapshot for label, values in c.identities.items() for v in values} == named
