"""`shared.runtime.Platform`: `/readyz` says when a consumer has stopped on its own, and shutting
down after that still stops everything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from shared.contracts import CUSTOMER_EVENTS, CustomerEvent
from shared.kafka import Consumed
from shared.runtime import Platform, install_common
from shared.settings import BaseServiceSettings
from tests.support import eventually, running


class RuntimeSettings(BaseServiceSettings):
    service_name: str = "runtime_test"
    db_schema: str = "runtime"


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
        # A failure the runner has no answer for (a bug in the client or in the runner): the
        # consumer stops, and must not look alive while its partitions wait.
        consumer = runner._consumer
        assert consumer is not None

        async def broken_fetch(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a fetch the runner cannot go on from")

        consumer.getmany = broken_fetch  # type: ignore[method-assign]
        await eventually(lambda: not runner.running, timeout=20)
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "a fetch the runner cannot go on from" in response.json()["down"]["consumers"]
    # The lifespan's shutdown ran to the end although the consumer had failed.
    assert not platform.started
