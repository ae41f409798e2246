"""Killing any one service process (SIGKILL) in the middle of a flow and starting it again: the flow
completes, nothing is lost, no message is sent twice.

The notifier's guarantee is at most once per message: a message whose provider call was in flight at
the kill may or may not have gone out, and ends `failed` ("outcome unknown ..."); every other message
is sent exactly once after the restart. Short stale timeouts let the restarted notifier settle fast.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.e2e.conftest import WRITE_KEY, Platform
from tests.e2e.test_lifecycle_flows import setup_welcome_journey
from tests.support import eventually, read_topic

PLATFORM_ENV = {"CLM_CLAIM_STALE_AFTER_S": "3", "CLM_SENDING_STALE_AFTER_S": "6"}


async def post_sign_ups(c: httpx.AsyncClient, p: Platform, users: list[str], cohort: str) -> None:
    for user in users:
        batch = {
            "batch": [
                {
                    "type": "identify",
                    "userId": user,
                    "messageId": f"{user}-identify",
                    "traits": {"email": f"{user}@example.com", "first_name": user},
                },
                {
                    "type": "track",
                    "userId": user,
                    "messageId": f"{user}-signup",
                    "event": "Signed Up",
                    "properties": {"cohort": cohort},
                },
            ]
        }
        # An SDK retries until it gets a 2xx (same messageIds: ingest dedupes them).
        for _ in range(100):
            try:
                r = await c.post(f"{p.url('ingest')}/v1/batch", json=batch, auth=(WRITE_KEY, ""))
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"ingest never accepted {user}")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["ingest", "segmenter", "journey_engine", "notifier"])
async def test_sigkill_mid_flow_loses_nothing_and_sends_nothing_twice(
    platform: Platform, victim: str
) -> None:
    s = uuid.uuid4().hex[:6]
    users = [f"crash-{victim}-{s}-{i}" for i in range(30)]
    async with httpx.AsyncClient(timeout=10) as c:
        await setup_welcome_journey(c, platform, s)
        await post_sign_ups(c, platform, users[:10], s)
        sending = asyncio.create_task(post_sign_ups(c, platform, users[10:], s))
        if victim == "notifier":
            # Killed while it is sending: once the later sign-ups' emails start going out.
            await eventually(
                lambda: any(platform.mails_to(f"{u}@example.com") for u in users[10:]), timeout=60
            )
        else:
            await asyncio.sleep(0.3)
        # SIGKILL: no shutdown hook runs, work in flight is cut off wherever it was.
        await asyncio.to_thread(platform.processes.processes[victim].kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(platform.processes.restart, victim)
        await sending

        if victim != "notifier":

            def everyone_mailed() -> bool:
                return all(platform.mails_to(f"{u}@example.com") for u in users)

            await eventually(everyone_mailed, timeout=60, interval=0.5)
            await asyncio.sleep(1.5)  # time for a duplicate to show up, if one were coming
            counts = {u: len(platform.mails_to(f"{u}@example.com")) for u in users}
            assert set(counts.values()) == {1}, {u: n for u, n in counts.items() if n != 1}
            return

        async def outcome_unknown() -> set[str]:
            statuses = await read_topic(platform.status_topic(), idle=0.5, timeout=10)
            return {
                s["value"]["customer_id"]
                for s in statuses
                if s["value"]["customer_id"] in users
                and s["value"]["status"] == "failed"
                and str(s["value"].get("reason", "")).startswith("outcome unknown")
            }

        async def everyone_settled() -> bool:
            # Mailed, or resolved as unknown (in flight at the kill) after the stale timeout.
            unknown = await outcome_unknown()
            return all(u in unknown or platform.mails_to(f"{u}@example.com") for u in users)

        await eventually(everyone_settled, timeout=60, interval=0.5)
        await asyncio.sleep(1.5)  # time for a duplicate to show up, if one were coming
        counts = {u: len(platform.mails_to(f"{u}@example.com")) for u in users}
        unknown = await outcome_unknown()
        summary = {
            "mailed once": sum(n == 1 for n in counts.values()),
            "mailed twice or more": {u: n for u, n in counts.items() if n > 1},
            "outcome unknown (in flight at the kill)": sorted(unknown),
            "not mailed and not unknown": sorted(u for u, n in counts.items() if n == 0 and u not in unknown),
        }
        print(f"notifier SIGKILL: {summary}")
        assert not summary["mailed twice or more"], summary
        assert not summary["not mailed and not unknown"], summary
        # Only messages whose provider call was in flight can be unknown: at most one per SMTP connection.
        assert len(unknown) <= 16, summary
