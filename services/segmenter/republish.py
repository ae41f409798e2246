"""Re-announcing every profile on clm.profiles.v1 (`kind=snapshot`), and every stored membership on
clm.segment-membership.v1 (cause `resync`: state, to which no journey reacts), on an operator's request: a
consumer whose projection was lost or is new (a restored notifier database, a journey engine added
after the topic's retention) rebuilds it from these. One job at a time per process, in keyset chunks,
each one transaction whose outbox rows are written by SQL; consumers dedupe on the event ids (the
job id is in them, so a second job announces again). A job dies with its process: run it again."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.segmenter.conflicts import hold_for_job, retry_job_chunk
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.clock import Clock
from shared.contracts.topics import PROFILES, SEGMENT_MEMBERSHIP
from shared.privacy import erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)


@dataclass
class RepublishJob:
    job_id: str
    total: int
    started_at: datetime
    done: int = 0
    memberships: int = 0
    finished_at: datetime | None = None
    error: str | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.finished_at is None and self.error is None

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": "running" if self.running else ("failed" if self.error else "done"),
            "customers_total": self.total,
            "customers_done": self.done,
            "memberships_announced": self.memberships,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }


class Republisher:
    def __init__(
        self, settings: SegmenterSettings, platform: Platform, clock: Clock, chunk: int = 5000
    ) -> None:
        self.settings = settings
        self.platform = platform
        self.clock = clock
        self.chunk = chunk
        self.job: RepublishJob | None = None

    async def start(self) -> RepublishJob | None:
        """A new job, or None while one runs."""
        if self.job is not None and self.job.running:
            return None
        # Claimed before the first await: a second request meanwhile sees it running.
        job = RepublishJob(f"republish-{uuid.uuid4().hex[:12]}", 0, self.clock.now())
        self.job = job
        try:
            async with self.platform.unit_of_work() as uow:
                job.total = await profile_store.customer_count(uow.session)
        except Exception as exc:
            job.error = repr(exc)
            raise
        job._task = asyncio.create_task(self._run(job), name=job.job_id)
        self.platform.background.append(job._task)  # cancelled on shutdown, with the other loops
        return job

    async def _run(self, job: RepublishJob) -> None:
        topic = self.settings.topic(PROFILES.name)
        # Each membership names its own segment: the announcement's one is not used.
        resync = segment_store.Announcement.of(
            self.settings.topic(SEGMENT_MEMBERSHIP.name), self.settings.service_name, "", self.clock.now()
        )
        after: str | None = None
        try:
            while True:
                announce = {
                    "topic": topic,
                    "producer": self.settings.service_name,
                    "produced_ms": str(int(time.time() * 1000)),
                }
                chunk = functools.partial(self._chunk, job, after, announce, resync)
                # The chunk holds its customers in id order: it may give way to an event batch.
                ids, memberships = await retry_job_chunk(chunk, "republish chunk")
                self.platform.relay.notify()  # rows written by SQL, not through uow.emit
                job.done += len(ids)
                job.memberships += memberships
                if len(ids) < self.chunk:
                    break
                after = ids[-1]
            job.finished_at = self.clock.now()
            log.info("profiles republished", extra={"job_id": job.job_id, "customers": job.done})
        except Exception as exc:
            job.error = repr(exc)
            log.exception("republishing profiles failed", extra={"job_id": job.job_id})

    async def _chunk(
        self,
        job: RepublishJob,
        after: str | None,
        announce: dict[str, str],
        resync: segment_store.Announcement,
    ) -> tuple[list[str], int]:
        """One chunk's snapshots and resync announcements, in one unit of work: (the customers, in id
        order, memberships)."""
        memberships = 0
        async with self.platform.unit_of_work() as uow:
            # A snapshot read before an erasure but committed after it would rebuild the
            # erased profile in every projection: the chunk commits before the erasure starts.
            await erasure_gate(uow.session, exclusive=False)
            await hold_for_job(uow.session)  # the chunk gives way to an event batch holding a customer
            ids = await profile_store.snapshot_chunk(
                uow.session,
                after,
                self.chunk,
                job.job_id,
                announce,
                self.settings.profile_identities_per_message,
            )
            if ids:
                # Those the chunk holds (not an id range: a customer created in it since is not held).
                memberships = await segment_store.resync_chunk(uow.session, ids, job.job_id, resync)
        return ids, memberships

    async def wait(self) -> None:
        if self.job is not None and self.job._task is not None:
            await asyncio.gather(self.job._task, return_exceptions=True)
