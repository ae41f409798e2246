"""Retention: what a service keeps only for a while (timelines, send ledgers, audit logs) is deleted
in short batches, one transaction each, by one replica at a time, every `retention_interval_s`.

A rule is one statement that deletes at most `:batch` rows older than `:cutoff` and returns a row per
row deleted; it runs until a batch comes back short. A rule of 0 days keeps its rows forever (the
default everywhere: retention is the operator's decision).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import Clock
from shared.db.locks import try_exclusive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionRule:
    name: str  # what it prunes, for the logs
    days: float  # rows older than this go; 0: kept forever
    delete_sql: str  # deletes at most :batch rows older than :cutoff, RETURNING one row each


# Every service keeps an admin audit log (`shared.audit`).
def audit_log_rule(days: float) -> RetentionRule:
    return RetentionRule(
        "audit_log",
        days,
        "DELETE FROM audit_log WHERE id IN "
        "(SELECT id FROM audit_log WHERE at < :cutoff ORDER BY at LIMIT :batch) RETURNING 1",
    )


class Retention:
    def __init__(
        self,
        engine: AsyncEngine,
        schema: str,
        clock: Clock,
        rules: Sequence[RetentionRule],
        *,
        interval_s: float,
        batch: int = 5000,
    ) -> None:
        self.engine = engine
        self.lock = f"retention:{schema}"
        self.clock = clock
        self.rules = [r for r in rules if r.days > 0]
        self.interval_s = interval_s
        self.batch = batch

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    async def run_once(self) -> dict[str, int]:
        """Rows deleted per rule (nothing when another replica holds the round)."""
        deleted: dict[str, int] = {}
        async with try_exclusive(self.engine, self.lock) as mine:
            if not mine:
                return deleted
            now = self.clock.now()
            for rule in self.rules:
                cutoff = now - timedelta(days=rule.days)
                total, started = 0, time.perf_counter()
                while True:
                    async with self.engine.begin() as conn:
                        n = len(
                            (
                                await conn.execute(
                                    text(rule.delete_sql), {"cutoff": cutoff, "batch": self.batch}
                                )
                            ).all()
                        )
                    total += n
                    if n < self.batch:
                        break
                deleted[rule.name] = total
                if total:
                    log.info(
                        "retention",
                        extra={
                            "rule": rule.name,
                            "deleted": total,
                            "s": round(time.perf_counter() - started, 2),
                        },
                    )
        return deleted

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention round failed; retrying next round")
            await asyncio.sleep(self.interval_s)
