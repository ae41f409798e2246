"""`shared.db.outbox.OutboxRelay` on rows Kafka cannot take, against the real database and broker: a
row too large for its topic is parked in `outbox_parked`, and the rows behind it are published."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY
from sqlalchemy import text

from shared.contracts import PROFILES, Headers, ProfileChanged, ProfileChangeKind
from shared.db import messaging_tables
from shared.db.engine import ensure_schema
from shared.db.outbox import _headers
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.support import eventually, messaging_platform, read_topic, set_topic_configs


class RelaySettings(BaseServiceSettings):
    service_name: str = "relay_test"
    db_schema: str = "relay"


@pytest.fixture
async def platform(make_settings: Callable[..., Any]) -> AsyncIterator[Platform]:
    # One partition: every message below shares it, so a refused batch would hold back all of them.
    async with messaging_platform(make_settings(RelaySettings, topic_partitions=1)) as p:
        yield p


def change(customer: str, padding: int = 0) -> ProfileChanged:
    return ProfileChanged(
        event_id=str(uuid.uuid4()),
        customer_id=customer,
        kind=ProfileChangeKind.TRAITS_CHANGED,
        occurred_at=datetime.now(UTC),
        traits={"plan": "pro", "notes": "x" * padding},
        changed_traits=["notes"],
    )


async def parked(platform: Platform) -> list[dict[str, Any]]:
    async with platform.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, topic, key, value, headers, created_at, reason, parked_at FROM outbox_parked")
        )
        return [dict(r._mapping) for r in rows]


async def outbox_count(platform: Platform) -> int:
    async with platform.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM outbox")) or 0)


def parked_metric(platform: Platform) -> float:
    topic = platform.settings.topic(PROFILES.name)
    labels = {"service": platform.settings.service_name, "topic": topic}
    return REGISTRY.get_sample_value("clm_outbox_parked_total", labels) or 0.0


async def test_a_row_larger_than_kafka_takes_is_parked_and_the_rows_behind_it_are_published(
    platform: Platform,
) -> None:
    """A profile whose traits add up past 1 MB: the broker refused it on every pass, the delete of
    the rows taken with it rolled back, and nothing behind it was ever published."""
    before, big, after = change("c1"), change("c1", padding=1_100_000), change("c2")
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", before, correlation_id="corr-big")
        uow.emit(PROFILES.name, "c1", big, correlation_id="corr-big")
        uow.emit(PROFILES.name, "c2", after)
    got = await read_topic(platform.settings.topic(PROFILES.name), count=2, timeout=20)
    assert [m["value"]["event_id"] for m in got] == [before.event_id, after.event_id]
    assert await eventually(lambda: parked(platform), timeout=5)
    [row] = await parked(platform)
    assert row["key"] == b"c1"
    assert orjson.loads(row["value"])["event_id"] == big.event_id
    assert row["headers"][Headers.EVENT_ID] == big.event_id
    assert row["headers"][Headers.CORRELATION_ID] == "corr-big"
    assert "kafka_max_message_bytes" in row["reason"]
    assert row["topic"] == platform.settings.topic(PROFILES.name)
    assert row["created_at"] <= row["parked_at"]
    assert await outbox_count(platform) == 0
    assert parked_metric(platform) == 1
    # Nothing was lost or doubled: what is published plus what is parked is what was emitted.
    assert await read_topic(platform.settings.topic(PROFILES.name), idle=1.0, timeout=5) == got


async def test_a_batch_the_broker_refuses_as_too_large_is_sent_one_by_one_and_the_refused_row_parked(
    platform: Platform,
) -> None:
    """The topic's max.message.bytes is below `kafka_max_message_bytes` (a misconfiguration): the
    broker refuses the batch; its messages go one at a time and the one it refuses is parked. The
    producer goes on sending to that partition afterwards (the refused batch had used up sequence
    numbers of the idempotent producer)."""
    s = platform.settings
    topic = s.topic(PROFILES.name)
    await set_topic_configs(topic, {"max.message.bytes": "20000"})
    first = change("c1")  # the partition has a batch of this producer before the refused one
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", first)
    await read_topic(topic, count=1, timeout=15)
    small1, big, small2 = change("c1"), change("c1", padding=50_000), change("c1")
    async with platform.unit_of_work() as uow:
        for event in (small1, big, small2):
            uow.emit(PROFILES.name, "c1", event)
    got = await read_topic(topic, until=lambda ms: small2.event_id in _ids(ms), timeout=30)
    assert big.event_id not in _ids(got)
    assert {first.event_id, small1.event_id, small2.event_id} == set(_ids(got))
    [row] = await eventually(lambda: parked(platform), timeout=5)
    assert orjson.loads(row["value"])["event_id"] == big.event_id
    assert row["reason"].startswith("refused by the broker")
    # Later rows still reach the partition.
    later = change("c1")
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", later)
    got = await read_topic(topic, until=lambda ms: later.event_id in _ids(ms), timeout=20)
    assert later.event_id in _ids(got)
    assert await outbox_count(platform) == 0


def _ids(messages: list[dict[str, Any]]) -> list[str]:
    return [m["value"]["event_id"] for m in messages if m["value"]]


async def inbox_ids(platform: Platform) -> list[str]:
    async with platform.engine.connect() as conn:
        return list((await conn.execute(text("SELECT message_id FROM inbox ORDER BY 1"))).scalars())


async def test_inbox_ids_are_pruned_after_the_retention_setting_a_chunk_at_a_time(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(RelaySettings, inbox_retention_days=2)
    await ensure_schema(settings.database_url, settings.db_schema)
    platform = Platform(settings, migrations=None)
    await platform.start()
    try:
        relay = platform.relay
        await relay.stop()  # its loop would prune too: here each prune is called by the test
        async with platform.engine.begin() as conn:
            await conn.run_sync(lambda c: messaging_tables.define(sa.MetaData())[0].metadata.create_all(c))
            await conn.execute(
                text(
                    "INSERT INTO inbox (consumer, message_id, processed_at) "
                    "SELECT 'c', 'old' || lpad(i::text, 2, '0'), now() - interval '3 days' "
                    "FROM generate_series(1, 12) i"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO inbox (consumer, message_id, processed_at) "
                    "VALUES ('c', 'kept-1d', now() - interval '1 day'), ('c', 'kept-now', now())"
                )
            )
        relay.prune_chunk = 5
        relay._last_prune = 0.0  # due
        left = []
        for _ in range(3):
            await relay._prune_inbox()
            left.append(len(await inbox_ids(platform)))
        # A chunk per call, the next ones at once while chunks come back full; then not before the interval.
        assert left == [9, 4, 2]
        await relay._prune_inbox()
        assert await inbox_ids(platform) == ["kept-1d", "kept-now"]
    finally:
        await platform.stop()


async def test_a_failed_inbox_prune_is_not_a_failed_relay_pass(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    """The pass's rows were published: a prune that fails (here: no inbox table) is logged as such,
    not as a failed relay pass with its back-off."""
    async with platform.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE inbox RENAME TO inbox_elsewhere"))
    platform.relay._last_prune = 0.0  # due at the next pass
    event = change("c1")
    with caplog.at_level(logging.WARNING, logger="shared.db.outbox"):
        async with platform.unit_of_work() as uow:
            uow.emit(PROFILES.name, "c1", event)
        got = await read_topic(platform.settings.topic(PROFILES.name), count=1, timeout=15)
        await eventually(
            lambda: any("inbox prune failed" in r.getMessage() for r in caplog.records), timeout=5
        )
    assert _ids(got) == [event.event_id]
    assert not [r for r in caplog.records if "relay pass failed" in r.getMessage()]


async def test_a_pass_that_rolls_back_parks_and_counts_nothing(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parked row was counted and logged before the pass committed: a pass that then failed (the
    broker down) reported a row parked that was not, and counted it again on the next pass."""
    await platform.relay.stop()  # this test runs the passes
    counted = parked_metric(platform)

    async def broker_down(messages: Any) -> None:
        raise KafkaConnectionError("broker down")

    monkeypatch.setattr(platform.producer, "send_batched", broker_down)
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", change("c1", padding=1_100_000))
        uow.emit(PROFILES.name, "c2", change("c2"))
    with pytest.raises(KafkaConnectionError):
        await platform.relay.run_once()
    assert await parked(platform) == [] and await outbox_count(platform) == 2
    assert parked_metric(platform) == counted and platform.relay.parked == 0
    monkeypatch.undo()
    assert await platform.relay.run_once() == 2
    assert len(await parked(platform)) == 1 and parked_metric(platform) == counted + 1


async def test_a_send_that_never_settles_rolls_the_pass_back_after_the_send_timeout(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch appended to a producer as it was renewed may never settle: the pass held its
    transaction and the schema's relay lock for ever, so no relay published anything again."""
    await platform.relay.stop()
    platform.settings.outbox_send_timeout_s = 0.3

    async def never_settles(messages: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(platform.producer, "send_batched", never_settles)
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", change("c1"))
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(platform.relay.run_once(), 10)
    assert asyncio.get_running_loop().time() - started < 5  # the relay's own bound, not the test's
    assert await outbox_count(platform) == 1  # rolled back: taken again by the next pass
    monkeypatch.undo()
    assert await platform.relay.run_once() == 1
    assert await outbox_count(platform) == 0


async def test_a_pass_takes_about_outbox_batch_bytes_and_always_at_least_one_row(platform: Platform) -> None:
    """A pass sends its rows under one send timeout: with only a row budget, 5,000 profile snapshots of
    hundreds of KB each were one pass. Rows are taken while their values start within the byte budget
    (one larger than the budget goes alone), and the relay goes on at once after a cut-short pass."""
    await platform.relay.stop()  # this test runs the passes
    platform.settings.outbox_batch_bytes = 10_000
    platform.settings.outbox_pack_bytes = 1  # a row for each message
    changes = [change("big", padding=30_000)] + [change(f"c{i}", padding=4_000) for i in range(5)]
    async with platform.unit_of_work() as uow:
        for c in changes:
            uow.emit(PROFILES.name, c.customer_id, c)
    # The big one alone; then ~4.3 KB each: three start within 10,000 bytes, then the last two.
    assert [await platform.relay.run_once() for _ in range(4)] == [1, 3, 2, 0]
    got = await read_topic(platform.settings.topic(PROFILES.name), count=6, timeout=15)
    assert [m["value"]["event_id"] for m in got] == [c.event_id for c in changes]


async def test_after_a_pass_cut_short_by_the_byte_budget_the_relay_goes_on_at_once(
    platform: Platform,
) -> None:
    platform.settings.outbox_batch_bytes = 10_000
    platform.settings.outbox_pack_bytes = 1  # a row for each message
    platform.settings.outbox_poll_interval_s = 60.0  # a relay that waited for its poll would not finish
    await asyncio.sleep(0.5)  # the relay's current wait (the old interval) is over
    changes = [change(f"c{i}", padding=12_000) for i in range(4)]  # one row per pass
    async with platform.unit_of_work() as uow:  # its commit wakes the relay once
        for c in changes:
            uow.emit(PROFILES.name, c.customer_id, c)
    got = await read_topic(platform.settings.topic(PROFILES.name), count=4, timeout=10)
    assert [m["value"]["event_id"] for m in got] == [c.event_id for c in changes]


def test_row_headers_become_kafka_headers_whatever_json_values_they_hold() -> None:
    """`outbox_row` writes string values; other JSON values (a row written by hand, an earlier
    version) are sent as their text, as before the string-only fast path."""
    assert _headers('{"a": "x", "b": "\u00e9"}') == (("a", b"x"), ("b", "\u00e9".encode()))
    assert _headers({"a": "x", "n": 5, "z": None}) == (("a", b"x"), ("n", b"5"), ("z", b"None"))
    assert _headers([["a", "x"], ["n", 5]]) == (("a", b"x"), ("n", b"5"))


async def packed_rows(platform: Platform) -> list[tuple[int | None, str | None]]:
    async with platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT messages, topic FROM outbox ORDER BY id"))
        return [(r[0], r[1]) for r in rows]


async def test_a_unit_of_works_messages_are_one_outbox_row_published_in_order_with_their_headers(
    platform: Platform,
) -> None:
    await platform.relay.stop()  # this test runs the passes
    changes = [change(f"c{i % 3}") for i in range(7)]
    async with platform.unit_of_work() as uow:
        for i, c in enumerate(changes):
            uow.emit(PROFILES.name, c.customer_id, c, correlation_id=f"corr-{i}")
    assert await packed_rows(platform) == [(7, None)]
    relayed = REGISTRY.get_sample_value(
        "clm_outbox_relayed_total", {"service": platform.settings.service_name}
    )
    assert await platform.relay.run_once() == 7  # messages, not rows
    assert platform.relay.relayed == 7
    assert (
        REGISTRY.get_sample_value("clm_outbox_relayed_total", {"service": platform.settings.service_name})
        == (relayed or 0) + 7
    )
    assert await outbox_count(platform) == 0
    got = await read_topic(platform.settings.topic(PROFILES.name), count=7, timeout=15)
    assert _ids(got) == [c.event_id for c in changes]
    assert [m["key"] for m in got] == [c.customer_id for c in changes]
    for i, m in enumerate(got):
        assert m["headers"][Headers.EVENT_ID] == changes[i].event_id
        assert m["headers"][Headers.CORRELATION_ID] == f"corr-{i}"
        assert m["headers"][Headers.PRODUCER] == platform.settings.service_name


async def test_packed_rows_hold_about_outbox_pack_bytes_and_a_larger_message_goes_alone(
    platform: Platform,
) -> None:
    await platform.relay.stop()
    platform.settings.outbox_pack_bytes = 12_000
    changes = [change(f"c{i}", padding=3_000) for i in range(5)]
    changes.insert(2, change("big", padding=20_000))
    async with platform.unit_of_work() as uow:
        for c in changes:
            uow.emit(PROFILES.name, c.customer_id, c)
    # ~3.5 KB each: two, then the big one (past 12,000 bytes with them) alone, then three.
    assert [n for n, _ in await packed_rows(platform)] == [2, 1, 3]
    assert await platform.relay.run_once() == 6
    got = await read_topic(platform.settings.topic(PROFILES.name), count=6, timeout=15)
    assert _ids(got) == [c.event_id for c in changes]


async def test_a_packed_row_stays_within_outbox_pack_bytes_however_much_its_values_escape(
    platform: Platform,
) -> None:
    """A value goes into the packed row as a JSON string: each quote and backslash written twice."""
    await platform.relay.stop()
    platform.settings.outbox_pack_bytes = 20_000
    quoted = [
        ProfileChanged(
            event_id=str(uuid.uuid4()),
            customer_id=f"c{i}",
            kind=ProfileChangeKind.TRAITS_CHANGED,
            occurred_at=datetime.now(UTC),
            traits={f'"k{j}"': '"\\"' * 20 for j in range(20)},
        )
        for i in range(30)
    ]
    async with platform.unit_of_work() as uow:
        for c in quoted:
            uow.emit(PROFILES.name, c.customer_id, c)
    async with platform.engine.connect() as conn:
        sizes = list(
            (await conn.execute(text("SELECT octet_length(value) FROM outbox ORDER BY id"))).scalars()
        )
    assert len(sizes) > 3 and max(sizes) <= 20_000
    assert await platform.relay.run_once() == 30


async def test_a_message_too_large_inside_a_packed_row_is_parked_by_its_place_and_the_rest_published(
    platform: Platform,
) -> None:
    platform.settings.outbox_pack_bytes = 4 * 1024 * 1024  # the big one packed with the others
    before, big, after = change("c1"), change("c1", padding=1_100_000), change("c2")
    async with platform.unit_of_work() as uow:
        for c in (before, big, after):
            uow.emit(PROFILES.name, c.customer_id, c, correlation_id="corr-x")
    got = await read_topic(platform.settings.topic(PROFILES.name), count=2, timeout=20)
    assert _ids(got) == [before.event_id, after.event_id]
    [row] = await eventually(lambda: parked(platform), timeout=5)
    assert (row["key"], orjson.loads(row["value"])["event_id"]) == (b"c1", big.event_id)
    assert row["headers"][Headers.EVENT_ID] == big.event_id
    assert row["headers"][Headers.CORRELATION_ID] == "corr-x"
    assert row["topic"] == platform.settings.topic(PROFILES.name)
    assert "kafka_max_message_bytes" in row["reason"]
    async with platform.engine.connect() as conn:
        assert await conn.scalar(text("SELECT part FROM outbox_parked")) == 1  # its place in its row
    assert await outbox_count(platform) == 0
    assert await read_topic(platform.settings.topic(PROFILES.name), idle=1.0, timeout=5) == got


async def test_packed_and_single_rows_are_published_in_the_order_written(platform: Platform) -> None:
    """Rows written by SQL (back-fills, the notifier's outcomes) stay one message each, between the
    packed rows of units of work: one order by row id, a packed row's messages in theirs."""
    await platform.relay.stop()
    first, second = [change("c1"), change("c1")], [change("c1"), change("c1")]
    single = change("c1")
    async with platform.unit_of_work() as uow:
        for c in first:
            uow.emit(PROFILES.name, "c1", c)
    async with platform.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox (topic, key, value, headers) "
                "VALUES (:t, 'c1', convert_to(:v, 'UTF8'), CAST(:h AS jsonb))"
            ),
            {
                "t": platform.settings.topic(PROFILES.name),
                "v": single.model_dump_json(),
                "h": orjson.dumps({Headers.EVENT_ID: single.event_id}).decode(),
            },
        )
    async with platform.unit_of_work() as uow:
        for c in second:
            uow.emit(PROFILES.name, "c1", c)
    assert [n for n, _ in await packed_rows(platform)] == [2, None, 2]
    assert await platform.relay.run_once() == 5
    got = await read_topic(platform.settings.topic(PROFILES.name), count=5, timeout=15)
    assert _ids(got) == [c.event_id for c in [*first, single, *second]]


async def test_with_outbox_pack_bytes_0_each_message_is_a_row_of_its_own(platform: Platform) -> None:
    """As releases before packing wrote them: set for a rolling upgrade from one, whose relays cannot
    read packed rows."""
    await platform.relay.stop()
    platform.settings.outbox_pack_bytes = 0
    changes = [change("c1"), change("c2")]
    async with platform.unit_of_work() as uow:
        for c in changes:
            uow.emit(PROFILES.name, c.customer_id, c)
    topic = platform.settings.topic(PROFILES.name)
    assert await packed_rows(platform) == [(None, topic), (None, topic)]
    assert await platform.relay.run_once() == 2
    got = await read_topic(topic, count=2, timeout=15)
    assert _ids(got) == [c.event_id for c in changes]


async def test_a_pass_takes_about_outbox_batch_size_messages_in_whole_rows(platform: Platform) -> None:
    """The budget counts messages, as when each was a row: it bounds what a pass sends one at a time
    when the broker refuses a batch as too large."""
    await platform.relay.stop()
    platform.settings.outbox_batch_size = 5
    for unit in range(3):
        async with platform.unit_of_work() as uow:
            for i in range(3):
                uow.emit(PROFILES.name, "c1", change(f"c{unit}-{i}"))
    # Rows of 3: the second starts within 5 messages, the third does not.
    assert [await platform.relay.run_once() for _ in range(3)] == [6, 3, 0]


async def insert_row(platform: Platform, **columns: Any) -> None:
    names = ", ".join(columns)
    async with platform.engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO outbox ({names}) VALUES ({', '.join(':' + c for c in columns)})"), columns
        )


async def test_an_unreadable_packed_row_is_parked_whole_and_the_rows_behind_it_published(
    platform: Platform,
) -> None:
    await platform.relay.stop()
    topic = platform.settings.topic(PROFILES.name)
    good = change("c1")
    await insert_row(platform, value=b'{"not": "an array"}', messages=1)
    await insert_row(
        platform, value=orjson.dumps([[topic, "c1", "{}", {}], [topic, None, "{}", {}]]), messages=2
    )
    await insert_row(platform, value=orjson.dumps([[topic, "c1", "{}", {}]]), messages=3)
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c1", good)
    assert await platform.relay.run_once() == 4
    got = await read_topic(topic, count=1, timeout=15)
    assert _ids(got) == [good.event_id]
    rows = sorted(await parked(platform), key=lambda r: r["id"])
    assert [r["reason"].split(":")[0] for r in rows] == ["unreadable row"] * 3
    async with platform.engine.connect() as conn:
        assert set((await conn.execute(text("SELECT part FROM outbox_parked"))).scalars()) == {-1}
    assert rows[0]["value"] == b'{"not": "an array"}' and rows[0]["topic"] == "(packed)"
    assert await outbox_count(platform) == 0


async def test_a_row_of_one_message_too_large_is_parked_as_part_0(platform: Platform) -> None:
    """Rows written by SQL (a profile snapshot) are one message each."""
    await platform.relay.stop()
    topic = platform.settings.topic(PROFILES.name)
    big, after = change("c1", padding=1_100_000), change("c2")
    await insert_row(
        platform,
        topic=topic,
        key=b"c1",
        value=big.model_dump_json().encode(),
        headers=orjson.dumps({Headers.EVENT_ID: big.event_id}).decode(),
    )
    async with platform.unit_of_work() as uow:
        uow.emit(PROFILES.name, "c2", after)
    assert await platform.relay.run_once() == 2
    assert _ids(await read_topic(topic, count=1, timeout=15)) == [after.event_id]
    [row] = await parked(platform)
    assert row["headers"][Headers.EVENT_ID] == big.event_id and row["key"] == b"c1"
    async with platform.engine.connect() as conn:
        assert await conn.scalar(text("SELECT part FROM outbox_parked")) == 0


async def test_a_row_of_one_message_needs_its_topic_and_headers(platform: Platform) -> None:
    with pytest.raises(sa.exc.IntegrityError, match="outbox_row_shape"):
        await insert_row(platform, key=b"c1", value=b"{}", headers="{}")
    with pytest.raises(sa.exc.IntegrityError, match="outbox_row_shape"):
        await insert_row(platform, topic="t", value=b"{}")


async def test_packed_headers_of_any_json_value_are_sent_as_their_text(platform: Platform) -> None:
    """`outbox_row` writes string values; a packed row written otherwise is sent as before."""
    await platform.relay.stop()
    topic = platform.settings.topic(PROFILES.name)
    await insert_row(
        platform, value=orjson.dumps([[topic, "c1", '{"event_id": "x"}', {"a": "b", "n": 5}]]), messages=1
    )
    assert await platform.relay.run_once() == 1
    [got] = await read_topic(topic, count=1, timeout=15)
    assert (got["headers"]["a"], got["headers"]["n"]) == ("b", "5")
