"""`make bench-e2e`: from HTTP ingest to a mail accepted by the SMTP server, across the four service
processes, a real broker, database and SMTP server, with the demo's journeys active.

1. Maximum sustained rate: customers (already known, with an email) each post one `Bench Ping`
   event (in /v1/batch calls of 50, as SDKs batch); an immediate-send journey mails them.
   Rate = mails accepted by the SMTP server per second.
2. Latency at half that rate: paced posts; POST -> mail accepted, p50/p99, broken down per hop from
   the `clm-produced-at-ms` header each hop puts on its Kafka message:
   ingest (POST -> event on clm.events.v1), journey engine (event -> request on
   clm.messages.requested.v1), notifier (request -> mail accepted by the SMTP server).

The baseline of the ratio printed is the same mail sent straight with aiosmtplib (the least work the
platform's last hop must do), so the ratio says how much of the time the platform adds.
Last line: e2e_p99_ms=<p99 latency at half the maximum rate>.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

from bench.report import last_line, line, percentile, ratio
from deploy.demo import seed as demo_seed
from deploy.local.processes import PlatformProcesses
from deploy.local.smtp_sink import MailSink
from shared.contracts.headers import Headers
from shared.db.engine import drop_schema
from tests.support import delete_test_topics, free_port, read_topic

ADMIN = {"Authorization": "Bearer bench-admin"}
WRITE_KEY = "bench-write-key"


@dataclass
class TimedSink(MailSink):
    """The SMTP sink, noting when each mail was accepted (by recipient)."""

    accepted_at: dict[str, float] = field(default_factory=dict)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        for rcpt in envelope.rcpt_tos:
            self.accepted_at.setdefault(rcpt, time.time())
        return answer


async def setup(c: httpx.AsyncClient, p: PlatformProcesses) -> None:
    for topic_id, body in demo_seed.TOPICS.items():
        (
            await c.put(f"{p.url('notifier')}/v1/subscription-topics/{topic_id}", headers=ADMIN, json=body)
        ).raise_for_status()
    for template in demo_seed.TEMPLATES:
        (await c.post(f"{p.url('notifier')}/v1/templates", headers=ADMIN, json=template)).raise_for_status()
    segment_ids = {}
    for key, body in demo_seed.SEGMENTS.items():
        r = await c.post(f"{p.url('segmenter')}/v1/segments", headers=ADMIN, json=body)
        r.raise_for_status()
        segment_ids[key] = r.json()["id"]
    journeys = demo_seed.journeys(segment_ids)
    journeys["bench-immediate"] = {
        "name": "Immediate send",
        "category": "transactional",
        "entry": {"type": "event", "event": "Bench Ping"},
        "reentry": {"policy": "always"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "send", "type": "send", "channel": "email", "template_id": "demo-welcome"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [{"from": "start", "to": "send"}, {"from": "send", "to": "done"}],
    }
    for journey_id, definition in journeys.items():
        url = f"{p.url('journey_engine')}/v1/journeys"
        (
            await c.post(url, headers=ADMIN, json={"id": journey_id, "definition": definition})
        ).raise_for_status()
        (await c.post(f"{url}/{journey_id}/activate", headers=ADMIN)).raise_for_status()


async def identify_all(c: httpx.AsyncClient, p: PlatformProcesses, users: list[str]) -> None:
    for i in range(0, len(users), 100):
        batch = [
            {
                "type": "identify",
                "userId": u,
                "traits": {"email": f"{u}@bench.example", "first_name": "Bench"},
            }
            for u in users[i : i + 100]
        ]
        (
            await c.post(f"{p.url('ingest')}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, ""))
        ).raise_for_status()


async def ping(c: httpx.AsyncClient, p: PlatformProcesses, user: str, posted: dict[str, float]) -> None:
    posted[user] = time.time()
    body = {"userId": user, "event": "Bench Ping", "properties": {}}
    for _ in range(50):
        r = await c.post(f"{p.url('ingest')}/v1/track", json=body, auth=(WRITE_KEY, ""))
        if r.status_code == 200:
            return
        await asyncio.sleep(float(r.headers.get("Retry-After", "0.2")))
    raise RuntimeError(f"ingest refused {user}: {r.status_code}")


async def ping_batch(
    c: httpx.AsyncClient, p: PlatformProcesses, users: list[str], posted: dict[str, float]
) -> None:
    now = time.time()
    for u in users:
        posted[u] = now
    body = {"batch": [{"type": "track", "userId": u, "event": "Bench Ping", "properties": {}} for u in users]}
    for _ in range(50):
        r = await c.post(f"{p.url('ingest')}/v1/batch", json=body, auth=(WRITE_KEY, ""))
        if r.status_code == 200:
            return
        await asyncio.sleep(float(r.headers.get("Retry-After", "0.2")))
    raise RuntimeError(f"ingest refused a batch: {r.status_code}")


async def wait_mails(sink: TimedSink, users: list[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    wanted = {f"{u}@bench.example" for u in users}
    while time.monotonic() < deadline:
        if wanted <= sink.accepted_at.keys():
            return max(sink.accepted_at[a] for a in wanted)
        await asyncio.sleep(0.05)
    missing = len(wanted - sink.accepted_at.keys())
    raise RuntimeError(f"{missing} of {len(wanted)} mails did not arrive within {timeout:.0f}s")


async def raw_smtp_rate(port: int, n: int) -> float:
    """Baseline: the same number of mails straight to the SMTP server with aiosmtplib, 16 connections."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        while not queue.empty():
            i = queue.get_nowait()
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "bench@clm.local", f"raw{i}@raw.example", "Welcome"
            msg.set_content("Hi Bench, thanks for signing up.")
            await smtp.send_message(msg)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    return n / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    bootstrap, url = os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["DATABASE_URL"]
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    sink = await TimedSink.start(port=0)
    assert isinstance(sink, TimedSink)
    logs = Path(tempfile.mkdtemp(prefix="clm-bench-e2e-"))
    platform = PlatformProcesses(
        env={
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": url,
            "CLM_ADMIN_TOKEN": "bench-admin",
            "CLM_WRITE_KEYS": WRITE_KEY,
            "CLM_TOPIC_PARTITIONS": "4",
            "CLM_LOG_LEVEL": "WARNING",
        },
        log_dir=logs,
        ports={n: free_port() for n in ("ingest", "segmenter", "journey_engine", "notifier")},
        smtp_port=sink.port,
        namespace=namespace,
        start_smtp_sink=False,
    )
    await asyncio.to_thread(platform.start)
    try:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as c:
            await setup(c, platform)
            users = [f"b{i:06d}" for i in range(args.customers + args.latency_customers)]
            await identify_all(c, platform, users)
            await asyncio.sleep(3)  # profiles reach the journey engine's projection

            # 1. maximum sustained rate: everyone at once, posted as SDKs do under load (batches of 50):
            # a Python HTTP client sending single events tops out near 100-250 requests/s here, which
            # would measure the client, not the platform.
            burst = users[: args.customers]
            posted: dict[str, float] = {}
            started = time.time()
            await asyncio.gather(
                *(ping_batch(c, platform, burst[i : i + 50], posted) for i in range(0, len(burst), 50))
            )
            last = await wait_mails(sink, burst, timeout=300)
            max_rate = len(burst) / (last - started)
            line("maximum sustained rate, POST -> mail accepted", max_rate, "events/s")

            # 2. latency at half the maximum rate
            paced = users[args.customers :]
            interval = 2.0 / max_rate
            tasks = []
            t0 = time.monotonic()
            for i, u in enumerate(paced):
                delay = t0 + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(ping(c, platform, u, posted)))
            await asyncio.gather(*tasks)
            await wait_mails(sink, paced, timeout=120)
            line("paced rate (half the maximum)", 1 / interval, "events/s")

        topic = f"{namespace}.clm."
        events = await read_topic(topic + "events.v1", idle=2.0, timeout=60)
        requests = await read_topic(topic + "messages.requested.v1", idle=2.0, timeout=60)
        at_event = {
            m["key"]: int(m["headers"][Headers.PRODUCED_AT_MS]) / 1000
            for m in events
            if m["value"] and m["value"].get("event") == "Bench Ping"
        }
        at_request = {
            m["value"]["customer_id"]: int(m["headers"][Headers.PRODUCED_AT_MS]) / 1000
            for m in requests
            if m["value"] and m["value"].get("journey_id") == "bench-immediate"
        }
        total, hop_ingest, hop_journey, hop_notifier = [], [], [], []
        for u in paced:
            mail_at = sink.accepted_at[f"{u}@bench.example"]
            total.append((mail_at - posted[u]) * 1000)
            if u in at_event and u in at_request:
                hop_ingest.append((at_event[u] - posted[u]) * 1000)
                hop_journey.append((at_request[u] - at_event[u]) * 1000)
                hop_notifier.append((mail_at - at_request[u]) * 1000)
        for name, values in (
            ("total POST -> mail accepted", total),
            ("  ingest (POST -> clm.events.v1)", hop_ingest),
            ("  journey engine (event -> request)", hop_journey),
            ("  notifier (request -> mail accepted)", hop_notifier),
        ):
            line(f"{name} p50", percentile(values, 50), "ms")
            line(f"{name} p99", percentile(values, 99), "ms")
        raw = await raw_smtp_rate(sink.port, args.customers)
        ratio("platform rate / raw aiosmtplib rate (same mails)", max_rate, raw)
        last_line("e2e_p99_ms", percentile(total, 99))
    finally:
        await asyncio.to_thread(platform.stop)
        await sink.stop()
        for name in ("ingest", "segmenter", "journey_engine", "notifier"):
            await drop_schema(url, f"{name}_{namespace}")
        await delete_test_topics(f"{namespace}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=2000, help="customers in the maximum-rate burst")
    parser.add_argument("--latency-customers", type=int, default=1000, help="customers in the paced phase")
    asyncio.run(main(parser.parse_args()))
