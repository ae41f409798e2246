"""Test helpers shared by every test package: isolated settings, running apps, reading topics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from fastapi import FastAPI

from shared.kafka.consumer import ConsumerRunner
from shared.settings import BaseServiceSettings

S = TypeVar("S", bound=BaseServiceSettings)


def infra() -> tuple[str, str]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    url = os.environ.get("DATABASE_URL")
    if not bootstrap or not url:
        raise RuntimeError(
            "tests need a real Kafka and PostgreSQL: run `make test`, "
            "or set KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL"
        )
    return bootstrap, url


def isolated_settings(cls: type[S], namespace: str | None = None, **overrides: Any) -> S:
    """Settings whose topics and schema belong to this test alone (so tests can run in parallel)."""
    bootstrap, url = infra()
    ns = namespace or uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "database_url": url,
        "topic_prefix": f"t{ns}.",
        "topic_partitions": 2,
        "db_schema": f"{cls.model_fields['db_schema'].default}_t{ns}",
        "db_pool_size": 4,
        "consumer_retry_backoff_s": 0.05,
        "outbox_poll_interval_s": 0.05,
        "admin_token": "test-admin-token",
    }
    values.update(overrides)
    return cls.model_validate(values)


async def delete_test_topics(prefix: str) -> None:
    bootstrap, _ = infra()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def running(app: FastAPI, base_url: str = "http://testserver") -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (database, Kafka, consumers) and give an HTTP client to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30) as client:
            yield client


async def read_topic(
    topic: str,
    *,
    count: int | None = None,
    timeout: float = 10.0,
    until: Callable[[list[dict[str, Any]]], bool] | None = None,
    idle: float | None = None,
) -> list[dict[str, Any]]:
    """Every message of `topic` from the beginning, as {"key", "value", "headers", "partition", "offset"}.

    Stops at `count` messages, when `until(messages)` holds, after `idle` seconds without new
    messages once it has read what the topic held when first idle (a loaded host can take longer
    than `idle` to fetch what is already there), or at `timeout`.
    """
    bootstrap, _ = infra()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    ends: dict[TopicPartition, int] | None = None  # the topic's end offsets when first idle
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    out.append(
                        {
                            "key": r.key.decode() if r.key else None,
                            "value": _json_or_none(r.value),
                            "raw": r.value,
                            "headers": {k: v.decode() for k, v in (r.headers or ())},
                            "partition": r.partition,
                            "offset": r.offset,
                        }
                    )
                    last_new = time.monotonic()
            if count is not None and len(out) >= count:
                break
            if until is not None and until(out):
                break
            if idle is not None and time.monotonic() - last_new > idle:
                if ends is None:
                    ends = await _end_offsets(consumer, topic)
                if await _read_to(consumer, ends):
                    break
    finally:
        await consumer.stop()
    return out


async def _end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in partitions]
    return dict(await consumer.end_offsets(tps)) if tps else {}


async def _read_to(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    assigned = consumer.assignment()
    for tp, end in ends.items():
        if end > 0 and (tp not in assigned or await consumer.position(tp) < end):
            return False
    return True


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll an (async or sync) check until it returns a truthy value; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def _json_or_none(raw: bytes | None) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DisposableKafka:
    """A second, private Kafka broker a test may stop and start (the shared one must stay up)."""

    def __init__(self, home: Any) -> None:
        from deploy.local.stack import LocalKafka

        self.broker = LocalKafka(home, free_port(), free_port(), heap="256m")

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.broker.stop)


@contextlib.asynccontextmanager
async def disposable_kafka(home: Any) -> AsyncIterator[DisposableKafka]:
    kafka = DisposableKafka(home)
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


def fetch_options(runners: list[ConsumerRunner[Any]]) -> dict[str, tuple[int, int]]:
    """Each consumer's (fetch_min_bytes, fetch_max_wait_ms), by topic without its namespace."""
    return {r.topic.rsplit(".clm.", 1)[-1]: (r.fetch_min_bytes, r.fetch_max_wait_ms) for r in runners}


@contextlib.asynccontextmanager
async def messaging_platform(settings: BaseServiceSettings, *setup_sql: str) -> AsyncIterator[Any]:
    """A started `shared.runtime.Platform` whose schema holds the shared messaging tables (inbox,
    outbox, ...) and what `setup_sql` creates: for tests of the plumbing in `shared/` without a service."""
    import sqlalchemy as sa
    from sqlalchemy import text

    from shared.db import messaging_tables
    from shared.db.engine import create_engine, ensure_schema
    from shared.runtime import Platform

    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    async with engine.begin() as conn:
        md = sa.MetaData()
        messaging_tables.define(md)
        await conn.run_sync(md.create_all)
        for sql in setup_sql:
            await conn.execute(text(sql))
    await engine.dispose()
    platform = Platform(settings, migrations=None)
    await platform.start()
    try:
        yield platform
    finally:
        await platform.stop()


async def set_topic_configs(topic: str, configs: dict[str, str], timeout: float = 20) -> None:
    """Alter `topic`'s configs and wait until the broker reports them (it applies them once it has
    read its metadata log: a fixed one-second wait was too short on a loaded host)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infra()[0])
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])

        async def applied() -> bool:
            wanted = ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict.fromkeys(configs))
            [response] = await admin.describe_configs([wanted])
            entries = {e[0]: e[1] for resource in response.resources for e in resource[4]}
            return all(entries.get(k) == v for k, v in configs.items())

        await eventually(applied, timeout=timeout, interval=0.1)
    finally:
        await admin.close()
