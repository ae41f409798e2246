"""What every service's lifespan starts and stops: its schema and migrations, the topics, the
idempotent producer, the outbox relay and its consumers; plus health, metrics and error handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.clock import Clock
from shared.db.engine import create_engine, ensure_schema, session_factory
from shared.db.migrations import run_migrations
from shared.db.outbox import OutboxRelay
from shared.db.retention import Retention, RetentionRule, audit_log_rule
from shared.db.unit_of_work import UnitOfWork
from shared.heap import settle_heap
from shared.http import StorableTextGuard, install_error_handlers
from shared.kafka.admin import ensure_topics
from shared.kafka.consumer import Consumed, ConsumerRunner
from shared.kafka.producer import EventProducer
from shared.observability.health import Check, add_health_routes
from shared.observability.metrics import instrument
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)


class Platform:
    def __init__(
        self, settings: BaseServiceSettings, *, migrations: Path | None, startup_timeout_s: float = 60
    ) -> None:
        self.settings = settings
        self.migrations = migrations
        self.startup_timeout_s = startup_timeout_s
        self.engine: AsyncEngine = create_engine(
            settings.database_url,
            settings.db_schema,
            pool_size=settings.db_pool_size,
            plan_cache_mode=settings.db_plan_cache_mode,
        )
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(self.engine)
        self.producer = EventProducer(settings)
        self.relay = OutboxRelay(self.engine, self.producer, settings)
        self.consumers: list[ConsumerRunner[Any]] = []
        self.background: list[asyncio.Task[None]] = []
        self.on_consumers_stopped: list[Callable[[], Awaitable[None]]] = []
        self.retention: Retention | None = None
        self.started = False

    def keep_for(self, clock: Clock, *rules: RetentionRule) -> Retention:
        """The service's retention rules, plus the audit log's every service has; once started, a
        background loop applies those the settings turn on (none by default)."""
        self.retention = Retention(
            self.engine,
            self.settings.db_schema,
            clock,
            [audit_log_rule(self.settings.audit_retention_days), *rules],
            interval_s=self.settings.retention_interval_s,
        )
        return self.retention

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self.sessions, self.settings, on_commit=self.relay.notify)

    def consumer(
        self,
        topic: str,
        schema: type[T],
        purpose: str,
        handler: Callable[[Sequence[Consumed[T]]], Awaitable[None]],
        **options: Any,
    ) -> ConsumerRunner[T]:
        runner = ConsumerRunner(
            self.settings,
            topic=topic,
            schema=schema,
            group=self.settings.consumer_group(purpose),
            handler=handler,
            producer=self.producer,
            **options,
        )
        self.consumers.append(runner)
        return runner

    def run_in_background(self, name: str, coro: Callable[[], Awaitable[None]]) -> None:
        """A long-running loop (timers, schedulers) cancelled on shutdown."""
        self.background.append(asyncio.create_task(coro(), name=name))  # type: ignore[arg-type]

    async def start(self) -> None:
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        while True:
            try:
                await ensure_schema(self.settings.database_url, self.settings.db_schema)
                if self.migrations is not None:
                    await run_migrations(self.engine, self.migrations, self.settings.db_schema)
                await ensure_topics(self.settings)
                await self.producer.start()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("dependencies not ready; retrying start", extra={"error": repr(exc)})
                await self.producer.stop()
                await asyncio.sleep(1)
        await self.relay.start()
        if self.retention is not None and self.retention.enabled:
            self.run_in_background("retention", self.retention.run_forever)
        self.started = True
        log.info("platform started", extra={"seconds": round(time.monotonic() - started, 2)})

    async def start_consumers(self) -> None:
        for runner in self.consumers:
            await runner.start()

    async def stop(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for runner in self.consumers:
            await runner.stop()
        # Work the consumers started and that must finish before the outbox is drained.
        for hook in self.on_consumers_stopped:
            await hook()
        await self.relay.stop()
        await self.producer.stop()
        await self.engine.dispose()
        self.started = False

    async def ping_database(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def ping_kafka(self) -> None:
        await self.producer.ping()

    async def check_consumers(self) -> None:
        """Raise while a consumer has stopped on its own: its partitions wait, unconsumed, for good."""
        failed = [f"{r.topic}: {r.failure}" for r in self.consumers if r.failure is not None]
        if failed:
            raise RuntimeError("stopped: " + "; ".join(failed))

    def health_checks(self) -> dict[str, Check]:
        if not self.started:
            return {}
        return {"database": self.ping_database, "kafka": self.ping_kafka, "consumers": self.check_consumers}


def install_common(app: FastAPI, platform: Platform) -> None:
    """Health and readiness, `/metrics`, and the JSON error conventions (with the storable-text guard,
    inside the metrics middleware so that its 400s are counted)."""
    install_error_handlers(app)
    app.add_middleware(StorableTextGuard)
    instrument(app, platform.settings.service_name)
    add_health_routes(app, platform.health_checks)


class InsecureProduction(SystemExit):
    """Production settings that must not run (`BaseServiceSettings.insecure_settings`)."""


def refuse_insecure_production(settings: BaseServiceSettings) -> None:
    """In production, stop before serving anything while a secret is a development default (the
    process exits non-zero with the reasons, so a deployment shows them instead of running open)."""
    if settings.environment != "production":
        return
    problems = settings.insecure_settings()
    if problems:
        log.critical("refusing to start in production", extra={"problems": problems})
        raise InsecureProduction("refusing to start in production: " + "; ".join(problems))


def serve(app: FastAPI, settings: BaseServiceSettings) -> None:
    """A service's `python -m` entry point: refuse insecure production settings, settle the heap once
    everything is imported and the app built (see `shared.heap`), then serve it on uvloop until
    SIGTERM."""
    refuse_insecure_production(settings)
    settle_heap(settings.gc_young_threshold)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        timeout_graceful_shutdown=20,
    )
