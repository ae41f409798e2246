"""`/readyz` reflects the real broker: 503 naming Kafka while it is stopped, 200 once it is back."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from shared.runtime import Platform, install_common
from shared.settings import BaseServiceSettings
from tests.support import disposable_kafka, eventually, running


class ReadySettings(BaseServiceSettings):
    service_name: str = "ready_test"
    db_schema: str = "ready"


@pytest.mark.slow
async def test_readyz_follows_the_broker(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with disposable_kafka(tmp_path / "kafka") as kafka:
        settings = make_settings(ReadySettings, kafka_bootstrap_servers=kafka.bootstrap)
        platform = Platform(settings, migrations=None)
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
            await platform.start()
            yield
            await platform.stop()

        app = FastAPI(lifespan=lifespan)
        install_common(app, platform)
        async with running(app) as client:
            ok = await client.get("/readyz")
            assert ok.status_code == 200, ok.text
            assert ok.json()["status"] == "ready"
            assert (await client.get("/healthz")).json() == {"status": "alive"}

            await kafka.stop()

            async def down() -> bool:
                r = await client.get("/readyz")
                return r.status_code == 503 and "kafka" in r.json()["down"]

            await eventually(down, timeout=20, interval=0.5)
            body = (await client.get("/readyz")).json()
            assert "database" not in body["down"], "only the broker is down"

            await kafka.start()

            async def up() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(up, timeout=30, interval=0.5)
            metrics = (await client.get("/metrics")).text
            assert (
                'clm_http_requests_total{method="GET",route="/readyz",service="ready_test",status="503"}'
                in metrics
            )
