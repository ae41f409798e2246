"""Two profiles found to be one person (`identity_merged`): what the engine kept under the
merged-away id becomes the survivor's, so the person is not welcomed twice, a wait for their
message still hears its status, and their message log (which frequency caps count) is one."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.journey_engine.execution.engine import MERGED_AWAY
from tests.journey_engine.harness import engine_running
from tests.journey_engine.test_timing_and_rules import linear

SEND_AND_WAIT = [
    {"id": "hi", "type": "send", "channel": "email", "template_id": "hi"},
    {"id": "wait", "type": "delay", "duration": "P3D"},
]
WAIT_FOR_OPEN: dict[str, Any] = {
    "name": "Engagement",
    "entry": {"type": "event", "event": "Signed Up"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "hello"},
        {
            "id": "opened",
            "type": "wait_message",
            "send_node": "mail",
            "statuses": ["opened"],
            "timeout": "P2D",
        },
        {"id": "tag", "type": "update_trait", "traits": {"engaged": True}},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "mail"},
        {"from": "mail", "to": "opened"},
        {"from": "opened", "to": "tag", "branch": "matched"},
        {"from": "opened", "to": "done", "branch": "timeout"},
        {"from": "tag", "to": "done"},
    ],
}


async def test_the_survivor_takes_over_the_merged_away_profiles_journeys(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        both = await h.journey(linear("Both", "Ping", SEND_AND_WAIT))  # re-entry: once
        welcome = await h.journey(linear("Welcome", "Joined", SEND_AND_WAIT))
        engagement = await h.journey(WAIT_FOR_OPEN)
        await h.track("new", "Ping")
        await h.track("old", "Ping")  # the same person, not known to be yet
        await h.track("old", "Joined")
        await h.track("old", "Signed Up")
        requests = await h.requests(until=lambda m: len(m) >= 4)
        mail = next(m for m in requests if m["template_id"] == "hello")
        assert mail["customer_id"] == "old"

        await h.profile(
            "new",
            {"email": "ada@example.com"},
            kind="identity_merged",
            merged_ids=["old"],
            identities={"user_id": ["new", "old"]},
        )

        # Inside the same journey twice: the survivor's instance goes on, the other exits.
        assert sorted((r.customer_id, r.status, r.exit_reason or "") for r in await h.instances(both)) == [
            ("new", "active", ""),
            ("new", "exited", MERGED_AWAY),
        ]
        # Only the merged-away profile was inside: the survivor is now, and is not welcomed again
        # (re-entry `once` counts the merged-away profile's entry).
        assert [(r.customer_id, r.status) for r in await h.instances(welcome)] == [("new", "active")]
        await h.track("new", "Joined")
        await h.track("old", "Joined")  # its id now resolves to the survivor
        assert len(await h.instances(welcome)) == 1
        # A wait for a message sent before the merge hears its status (named by the old id).
        await h.message_status("old", mail["message_id"], "opened")
        [waiting] = await h.instances(engagement)
        assert (waiting.customer_id, waiting.status, waiting.node_id) == ("new", "exited", "done")
        assert (
            await h.scalar("SELECT traits ->> 'engaged' FROM customers WHERE customer_id = 'new'") == "true"
        )
        # Caps and reports count the person's messages once, under the survivor.
        assert await h.scalar("SELECT count(*) FROM message_log WHERE customer_id = 'old'") == 0
        assert await h.scalar("SELECT count(*) FROM message_log WHERE customer_id = 'new'") == 4
        assert await h.scalar("SELECT count(*) FROM enrolments WHERE customer_id = 'old'") == 0
        assert await h.scalar("SELECT count(*) FROM customers WHERE customer_id = 'old'") == 0

        # Once the moved instance finished, the entry it made still counts for the survivor: re-entry
        # `once` lets no second welcome in.
        await h.advance(timedelta(days=4))
        assert [(r.customer_id, r.status) for r in await h.instances(welcome)] == [("new", "exited")]
        await h.track("new", "Joined")
        assert [(r.customer_id, r.status) for r in await h.instances(welcome)] == [("new", "exited")]
        [(entries,)] = await h.rows(
            "SELECT entries FROM enrolments WHERE journey_id = :j AND customer_id = 'new'", j=welcome
        )
        assert entries == 1
        requests = await h.requests(idle=1.0)
        assert sorted((m["customer_id"], m["template_id"]) for m in requests) == [
            ("new", "hi"),
            ("old", "hello"),
            ("old", "hi"),
            ("old", "hi"),
        ]


async def test_a_late_merge_into_a_profile_merged_on_since_goes_to_the_last_survivor(
    make_settings: Any,
) -> None:
    """Announcements of different customers travel on different partitions: `b` merged into `c` can
    be handled before `a` merged into `b`. What `a` had then goes to `c`, not to the dead `b`."""
    async with engine_running(make_settings) as h:
        welcome = await h.journey(linear("Welcome", "Joined", SEND_AND_WAIT))
        await h.track("a", "Joined")
        earlier = h.clock.now()
        h.clock.advance(timedelta(minutes=1))
        # In the segmenter: `a` merged into `b` (earlier), then `b` into `c`, whose announcement
        # carries every identifier; the engine handles them the other way round.
        await h.profile(
            "c", {}, kind="identity_merged", merged_ids=["b"], identities={"user_id": ["a", "b", "c"]}
        )
        await h.profile(
            "b",
            {"email": "b@example.com"},
            kind="identity_merged",
            merged_ids=["a"],
            identities={"user_id": ["a", "b"]},
            occurred_at=earlier,
        )
        assert [(r.customer_id, r.status) for r in await h.instances(welcome)] == [("c", "active")]
        assert await h.scalar("SELECT count(*) FROM enrolments WHERE customer_id = 'c'") == 1
        # The dead `b` got no projection row back from its late announcement.
        assert await h.scalar("SELECT count(*) FROM customers WHERE customer_id = 'b'") == 0
        for user in ("c", "a", "b"):
            await h.track(user, "Joined")
        assert len(await h.instances(welcome)) == 1


async def test_what_arrives_late_for_a_merged_away_profile_enters_it_in_nothing(make_settings: Any) -> None:
    """A membership or stage change of `old` sent before the merge and handled after it (another
    topic): `old` is no person any more, so no journey takes it in."""
    async with engine_running(make_settings) as h:
        vip = await h.journey(
            linear("VIP", "unused", SEND_AND_WAIT) | {"entry": {"type": "segment", "segment_id": "vip"}}
        )
        growth = {"type": "lifecycle_stage", "to_stage": "growth"}
        staged = await h.journey(linear("Staged", "unused", SEND_AND_WAIT) | {"entry": growth})
        await h.profile(
            "new", {}, kind="identity_merged", merged_ids=["old"], identities={"user_id": ["new", "old"]}
        )
        await h.membership("old", "vip")
        await h.profile(
            "old", {"email": "old@example.com"}, kind="stage_changed", stage="growth", previous="onboarding"
        )
        assert await h.instances(vip) == [] and await h.instances(staged) == []
        assert await h.scalar("SELECT count(*) FROM segment_members WHERE customer_id = 'old'") == 0
        assert await h.scalar("SELECT count(*) FROM customers WHERE customer_id = 'old'") == 0
        # The survivor itself still enters.
        await h.membership("new", "vip")
        assert [(r.customer_id, r.status) for r in await h.instances(vip)] == [("new", "active")]


async def test_a_merge_into_a_profile_whose_id_is_another_customers_identifier_stays_with_it(
    make_settings: Any,
) -> None:
    """Identifiers are values without their kind: customer `7` (an anonymousId) and customer
    `user:7` (userId 7) can both exist, and `7` may point at `user:7` in the identity table. A merge
    into `7` is `7`'s, not `user:7`'s."""
    async with engine_running(make_settings) as h:
        welcome = await h.journey(linear("Welcome", "Joined", SEND_AND_WAIT))
        await h.profile("7", {}, identities={"anonymous_id": ["7"]})
        h.clock.advance(timedelta(minutes=1))
        await h.profile("user:7", {}, identities={"user_id": ["7"]})
        await h.track("x", "Joined")
        h.clock.advance(timedelta(minutes=1))
        await h.profile(
            "7", {}, kind="identity_merged", merged_ids=["x"], identities={"anonymous_id": ["7", "x"]}
        )
        assert [(r.customer_id, r.status) for r in await h.instances(welcome)] == [("7", "active")]


async def test_a_status_reaches_its_instance_whatever_customer_it_names(make_settings: Any) -> None:
    """An instance entered under a raw userId before the profile was known keeps that id; when the
    segmenter then links the userId to its profile (a link, not a merge), the message's status still
    names the userId and still reaches the instance (by its id)."""
    async with engine_running(make_settings) as h:
        engagement = await h.journey(WAIT_FOR_OPEN)
        await h.track("u1", "Signed Up")
        [mail] = await h.requests(until=lambda m: len(m) >= 1)
        await h.profile("a1", {}, identities={"user_id": ["u1"], "anonymous_id": ["a1"]})
        await h.message_status("u1", mail["message_id"], "opened")
        [row] = await h.instances(engagement)
        assert (row.customer_id, row.status, row.node_id) == ("u1", "exited", "done")


async def test_after_a_merge_one_purchase_converts_the_person_once(make_settings: Any) -> None:
    """Both profiles finished the journey with their goal windows open; merged, one purchase is one
    conversion (the newest instance owns the goal, as for a customer who entered again), not two."""
    async with engine_running(make_settings) as h:
        j = linear("Promo", "Viewed", [{"id": "hi", "type": "send", "channel": "email", "template_id": "hi"}])
        j["goal"] = {"event": "Purchased", "within": "P7D"}
        jid = await h.journey(j)
        await h.track("old", "Viewed")
        h.clock.advance(timedelta(minutes=1))
        await h.track("new", "Viewed")
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 2
        await h.profile(
            "new", {}, kind="identity_merged", merged_ids=["old"], identities={"user_id": ["new", "old"]}
        )
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 1
        await h.track("new", "Purchased")
        converted = await h.rows(
            "SELECT customer_id, entered_at FROM instances "
            "WHERE journey_id = :j AND converted_at IS NOT NULL",
            j=jid,
        )
        assert [c for c, _ in converted] == ["new"]
        newest = await h.scalar("SELECT max(entered_at) FROM instances WHERE journey_id = :j", j=jid)
        assert converted[0][1] == newest
        assert (
            await h.scalar(
                "SELECT sum(n) FROM node_counts WHERE journey_id = :j AND metric = 'converted'", j=jid
            )
            == 1
        )


async def test_after_a_merge_the_instance_still_inside_owns_the_goal(make_settings: Any) -> None:
    """The merged-away profile finished the journey with its window open, the survivor entered since
    and is inside: a purchase converts the one inside, and the window counts nothing more."""
    async with engine_running(make_settings) as h:
        j = linear("Nurture", "Viewed", SEND_AND_WAIT, goal={"event": "Purchased", "within": "P7D"})
        jid = await h.journey(j)
        await h.track("old", "Viewed")
        await h.advance(timedelta(days=3, hours=1))  # old's path is over; its window stays open
        await h.track("new", "Viewed")
        assert await h.scalar("SELECT count(*) FROM goal_windows WHERE customer_id = 'old'") == 1
        await h.profile(
            "new", {}, kind="identity_merged", merged_ids=["old"], identities={"user_id": ["new", "old"]}
        )
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 0
        await h.track("new", "Purchased")
        converted = await h.rows(
            "SELECT status, entered_at FROM instances WHERE journey_id = :j AND converted_at IS NOT NULL",
            j=jid,
        )
        assert [status for status, _ in converted] == ["converted"]
        assert converted[0][1] == await h.scalar(
            "SELECT max(entered_at) FROM instances WHERE journey_id = :j", j=jid
        )
