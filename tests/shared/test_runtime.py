"""`shared.runtime.Platform`: `/readyz` says when a consumer has stopped on its own, and shutting
down after that still stops everything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from fastapi import FastAPI

from shared.contracts import CUSTOMER_EVENTS, CustomerEvent
from shared.kafka import Consumed
from shared.runtime import Platform, install_common
from shared.settings import BaseServiceSettings
from tests.support import eventually, running


class RuntimeSettings(BaseServiceSettings):
    service_name: str = "runtime_test"
    db_schema: str = "runtime"


class _NotUtf8(str):
    """A header name as another client may write it: bytes that are not UTF-8."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff"


async def _send_record_with_unparseable_header(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        # The pure-Python builder, which writes the name as its `encode` gives it.
        batch._builder = _DefaultRecordBatchBuilderPy(
            2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0, batch_size=16384
        )
        batch.append(timestamp=None, key=b"u1", value=b"{}", headers=[(_NotUtf8("x"), b"v")])
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def test_readyz_names_a_consumer_that_stopped_and_shutdown_still_completes(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(RuntimeSettings, topic_partitions=1)
    platform = Platform(settings, migrations=None)

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        pass

    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "unparseable", handle)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await platform.start_consumers()
        yield
        await platform.stop()

    app = FastAPI(lifespan=lifespan)
    install_common(app, platform)
    async with running(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        # aiokafka cannot parse this record (it raises UnicodeDecodeError from every fetch of it):
        # the consumer cannot go past it, and must not look alive while its partition waits.
        await _send_record_with_unparseable_header(settings.kafka_bootstrap_servers, runner.topic)
        await eventually(lambda: not runner.running, timeout=20)
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "UnicodeDecodeError" in response.json()["down"]["consumers"]
    # The lifespan's shutdown ran to the end although the consumer had failed.
    assert not platform.started
