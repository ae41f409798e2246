"""Inbox and outbox against the real database and broker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from shared.contracts import PROFILES, Headers, ProfileChanged, ProfileChangeKind
from shared.db.engine import Statement, driver_autocommit
from shared.db.unit_of_work import OUTBOX_OF_CHANGED, AnnouncedChanges
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.support import eventually, messaging_platform, read_topic


class OutboxSettings(BaseServiceSettings):
    service_name: str = "outbox_test"
    db_schema: str = "outbox"


@pytest.fixture
async def platform(make_settings):  # type: ignore[no-untyped-def]
    async with messaging_platform(
        make_settings(OutboxSettings),
        "CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)",
        "INSERT INTO counter VALUES (1, 0)",
    ) as p:
        yield p


def change(customer: str) -> ProfileChanged:
    return ProfileChanged(
        event_id=str(uuid.uuid4()),
        customer_id=customer,
        kind=ProfileChangeKind.TRAITS_CHANGED,
        occurred_at=datetime.now(UTC),
        traits={"plan": "pro"},
        changed_traits=["plan"],
    )


async def counter(platform: Platform) -> int:
    async with platform.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT n FROM counter WHERE id = 1")) or 0)


async def test_same_message_processed_twice_changes_state_once(platform: Platform) -> None:
    for _ in range(2):
        async with platform.unit_of_work() as uow:
            if await uow.claim("test.consumer", "message-1"):
                await uow.session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
    assert await counter(platform) == 1
    # another consumer has its own record of what it processed
    async with platform.unit_of_work() as uow:
        assert await uow.claim("other.consumer", "message-1")
    async with platform.unit_of_work() as uow:
        assert await uow.claim_many("test.consumer", ["message-1", "message-2", "message-2"]) == {"message-2"}


async def test_claim_is_undone_when_the_effect_rolls_back(platform: Platform) -> None:
    with pytest.raises(RuntimeError):
        async with platform.unit_of_work() as uow:
            assert await uow.claim("test.consumer", "message-9")
            await uow.session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
            raise RuntimeError("effect failed")
    assert await counter(platform) == 0
    async with platform.unit_of_work() as uow:
        assert await uow.claim("test.consumer", "message-9"), "a rolled-back claim must not hide the retry"


async def test_statements_sent_straight_to_asyncpg_are_inside_the_unit_of_work(platform: Platform) -> None:
    # The inbox claim and the outbox insert bypass SQLAlchemy; with no ORM statement before them they
    # must still be in the transaction (SQLAlchemy's adapter sends BEGIN lazily).
    with pytest.raises(RuntimeError):
        async with platform.unit_of_work() as uow:
            assert await uow.claim("test.consumer", "message-raw")
            uow.emit(PROFILES.name, "c-raw", change("c-raw"))
            await uow._flush_outbox()
            raise RuntimeError("effect failed")
    async with platform.engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM inbox")) == 0
        assert await conn.scalar(text("SELECT count(*) FROM outbox")) == 0
    async with platform.unit_of_work() as uow:
        assert await uow.claim("test.consumer", "message-raw")
    async with platform.unit_of_work() as uow:
        assert not await uow.claim("test.consumer", "message-raw")


async def test_committed_event_reaches_kafka_and_rolled_back_one_never_does(platform: Platform) -> None:
    kept, dropped = change("kept"), change("dropped")
    async with platform.unit_of_work() as uow:
        await uow.session.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
        uow.emit(PROFILES.name, "kept", kept, correlation_id="corr-1")
    with pytest.raises(RuntimeError):
        async with platform.unit_of_work() as uow:
            uow.emit(PROFILES.name, "dropped", dropped)
            raise RuntimeError("rolled back")
    # a second committed event after the rolled-back one: when it arrives, the dropped one had its chance
    marker = change("marker")
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "marker", marker)
    got = await read_topic(
        platform.settings.topic(PROFILES.name),
        until=lambda ms: any(m["key"] == "marker" for m in ms),
        timeout=15,
    )
    keys = [m["key"] for m in got]
    assert "kept" in keys and "marker" in keys
    assert "dropped" not in keys
    first = next(m for m in got if m["key"] == "kept")
    assert first["value"]["event_id"] == kept.event_id
    assert first["headers"][Headers.EVENT_ID] == kept.event_id
    assert first["headers"][Headers.CORRELATION_ID] == "corr-1"

    async def outbox_empty() -> bool:
        async with platform.engine.connect() as conn:
            return await conn.scalar(text("SELECT count(*) FROM outbox")) == 0

    # rows are deleted once the broker acknowledged them (the delete commits just after the ack)
    assert await eventually(outbox_empty, timeout=5)


async def test_relay_keeps_per_key_order(platform: Platform) -> None:
    events = [change("same-customer") for _ in range(50)]
    for e in events:
        async with platform.unit_of_work() as uow:
            uow.emit(PROFILES.name, "same-customer", e)
    got = await read_topic(platform.settings.topic(PROFILES.name), count=50, timeout=15)
    assert [m["value"]["event_id"] for m in got] == [e.event_id for e in events]


async def test_statement_runs_named_parameters_on_asyncpg_in_the_unit_of_work(platform: Platform) -> None:
    stmt = Statement("SELECT CAST(:n AS int) * 2, :label::text, CAST(:n AS int) + 1")
    # Each name gets one number however often it appears; `::` casts are not parameters.
    assert stmt.sql == "SELECT CAST($1 AS int) * 2, $2::text, CAST($1 AS int) + 1"
    assert stmt.names == ("n", "label")
    update = Statement("UPDATE counter SET n = n + :by WHERE id = :id")
    with pytest.raises(RuntimeError):
        async with platform.unit_of_work() as uow:
            assert [tuple(r) for r in await stmt.fetch(uow.session, {"n": 20, "label": "x"})] == [
                (40, "x", 21)
            ]
            assert await update.execute(uow.session, {"by": 5, "id": 1}) == 1
            raise RuntimeError("rolled back")
    assert await counter(platform) == 0
    async with platform.unit_of_work() as uow:
        assert await update.execute(uow.session, {"by": 5, "id": 1}) == 1
    assert await counter(platform) == 5


async def test_relay_publishes_rows_with_headers_in_the_earlier_list_of_pairs_form(
    platform: Platform,
) -> None:
    # Rows an earlier version wrote ([[name, value], ...]) may wait in the outbox across an upgrade.
    old = change("from-before")
    async with platform.unit_of_work() as uow:
        await uow.session.execute(
            text("INSERT INTO outbox (topic, key, value, headers) VALUES (:t, :k, :v, CAST(:h AS jsonb))"),
            {
                "t": platform.settings.topic(PROFILES.name),
                "k": b"from-before",
                "v": old.__pydantic_serializer__.to_json(old),
                "h": f'[["{Headers.EVENT_ID}", "{old.event_id}"], ["{Headers.CORRELATION_ID}", "corr-old"]]',
            },
        )
        uow.emit(PROFILES.name, "from-now", change("from-now"), correlation_id="corr-new")
    got = await read_topic(platform.settings.topic(PROFILES.name), count=2, timeout=15)
    by_key = {m["key"]: m["headers"] for m in got}
    assert by_key["from-before"][Headers.EVENT_ID] == old.event_id
    assert by_key["from-before"][Headers.CORRELATION_ID] == "corr-old"
    assert by_key["from-now"][Headers.CORRELATION_ID] == "corr-new"


async def test_a_change_and_its_announcements_in_one_statement_announce_only_the_rows_it_changed(
    platform: Platform,
) -> None:
    """`AnnouncedChanges`: messages emitted for rows the statement did not change are not inserted;
    the others are, in the order emitted, committed with the change, and relayed."""
    async with platform.engine.begin() as conn:
        await conn.execute(text("INSERT INTO counter VALUES (2, 0), (3, 0)"))
    bump = Statement(
        "WITH changed AS (UPDATE counter SET n = n + 1 WHERE id = ANY(CAST(:ids AS int[])) AND n = 0 "
        "RETURNING CAST(id AS text) AS id), "
        f"announced AS ({OUTBOX_OF_CHANGED.format(changed='changed', column='id')}) "
        "SELECT id FROM changed"
    )
    announced = AnnouncedChanges(platform.settings)
    sent = {owner: [change(f"c{owner}"), change(f"c{owner}")] for owner in ("1", "2", "4")}
    for owner, models in sent.items():
        for m in models:
            announced.emit(owner, PROFILES.name, f"c{owner}", m, correlation_id=f"corr-{owner}")
    async with driver_autocommit(platform.engine) as conn:
        # Row 4 does not exist: its messages are not inserted. Row 3 is not named: nothing to say.
        changed = await bump.fetch(conn, {"ids": [1, 2, 4], **announced.params()})
    assert sorted(r[0] for r in changed) == ["1", "2"]
    assert await counter(platform) == 1  # committed on its own
    platform.relay.notify()
    got = await read_topic(platform.settings.topic(PROFILES.name), count=4, timeout=15, idle=2)
    by_key: dict[str, list[str]] = {}
    for m in got:
        by_key.setdefault(m["key"], []).append(m["value"]["event_id"])
        assert m["headers"][Headers.CORRELATION_ID] == f"corr-{m['key'][1:]}"
    assert by_key == {f"c{o}": [m.event_id for m in sent[o]] for o in ("1", "2")}
    # Nothing changed by a second run, nothing announced.
    async with driver_autocommit(platform.engine) as conn:
        assert await bump.fetch(conn, {"ids": [1, 2], **announced.params()}) == []
    platform.relay.notify()
    assert len(await read_topic(platform.settings.topic(PROFILES.name), timeout=5, idle=2)) == 4
