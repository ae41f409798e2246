"""`make bench-e2e`: from HTTP ingest to a mail accepted by the SMTP server, across the four service
processes, a real broker, database and SMTP server, with the demo's journeys active.

0. Warm-up, not measured (`--warmup-s`, 60 s by default): single posts at the rate the paced phase
   will use on a typical run (`--warmup-rate`, 50/s), so the figures are those of a platform that
   has been running, not of a broker JVM still compiling.
1. Maximum sustained rate: customers (already known, with an email) each post one `Bench Ping`
   event (in /v1/batch calls of 50, as SDKs batch); an immediate-send journey mails them.
   Rate = mails accepted by the SMTP server per second.
2. Latency at half that rate, once the burst has drained (every consumer group caught up), after a
   lead-in of the same load that is not measured (`--lead-in-s`, 10 s): a load
   generator in its own process posts single `/v1/track` events on a fixed schedule (open loop: a
   slow answer does not delay the next post, and latency counts from the scheduled time), so the
   client's own queueing is not in the figures. POST -> mail accepted, p50/p99, broken down per hop
   from the `clm-produced-at-ms` header each hop puts on its Kafka message:
   ingest (POST -> event on clm.events.v1), journey engine (event -> request on
   clm.messages.requested.v1), notifier (request -> mail accepted by the SMTP server).

The baseline of the ratio printed is the same mail sent straight with aiosmtplib (the least work the
platform's last hop must do), so the ratio says how much of the time the platform adds.
Last line: e2e_p99_ms=<p99 latency at half the maximum rate>.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench import raw_http
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
    """The SMTP sink, noting when each mail was accepted (by recipient). It stands in for a mail
    provider on the same 2 cores, so it accepts without parsing or keeping the mail (the test sink
    parses every MIME message with the stdlib, ~3 ms of CPU a mail that the platform would pay for)."""

    accepted_at: dict[str, float] = field(default_factory=dict)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for rcpt in envelope.rcpt_tos:
            self.accepted_at.setdefault(rcpt, time.time())
        return "250 Message accepted"


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


class PacedLoad:
    """The paced phase's load generator (run in its own process): `rate` events/s over a few
    keep-alive connections, open loop: each post's time is its scheduled time, so a late answer
    counts against the platform instead of being hidden by the client (no coordinated omission).

    `flush_ms` 0 posts every event alone on `/v1/track`; otherwise events are collected and posted
    every `flush_ms` on `/v1/batch`, as SDKs do (latency then counts from that POST, not from when
    the SDK was handed the event)."""

    def __init__(
        self, url: str, users: list[str], rate: float, flush_ms: float, connections: int = 8
    ) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.users, self.rate, self.flush_s, self.connections = users, rate, flush_ms / 1000, connections
        self.posted: dict[str, float] = {}
        self.errors = 0

    def request(self, users: list[str]) -> bytes:
        events = [{"type": "track", "userId": u, "event": "Bench Ping", "properties": {}} for u in users]
        path, body = ("/v1/batch", {"batch": events}) if self.flush_s else ("/v1/track", events[0])
        return raw_http.post(self.host, path, WRITE_KEY, json.dumps(body).encode())

    async def connection(self, queue: asyncio.Queue[list[str] | None]) -> None:
        reader, writer = await raw_http.connect(self.host, self.port)
        while (users := await queue.get()) is not None:
            for _ in range(50):
                if await raw_http.exchange(reader, writer, self.request(users)) == 200:
                    break
                self.errors += 1
                await asyncio.sleep(0.2)
        writer.close()

    async def run(self) -> dict[str, float]:
        queue: asyncio.Queue[list[str] | None] = asyncio.Queue()
        workers = [asyncio.create_task(self.connection(queue)) for _ in range(self.connections)]
        t0 = time.time() + 0.2
        due = [(t0 + i / self.rate, user) for i, user in enumerate(self.users)]
        if self.flush_s:  # each event goes out with the first flush at or after it is due
            flushes: dict[float, list[str]] = {}
            for at, user in due:
                flush_at = t0 + -(-(at - t0) // self.flush_s) * self.flush_s
                flushes.setdefault(flush_at, []).append(user)
            posts = sorted(flushes.items())
        else:
            posts = [(at, [user]) for at, user in due]
        for at, users in posts:
            await asyncio.sleep(max(0.0, at - time.time()))
            for user in users:
                self.posted[user] = at
            queue.put_nowait(users)
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        return self.posted


def paced_load(url: str, users: list[str], rate: float, flush_ms: float) -> dict[str, float]:
    """Run `PacedLoad` in a child process; returns each user's scheduled post time."""
    child = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--pace", url, "--rate", str(rate), "--flush-ms", str(flush_ms)],
        input="\n".join(users).encode(),
        capture_output=True,
        check=True,
    )
    posted: dict[str, float] = json.loads(child.stdout)
    return posted


async def topic_sizes(bootstrap: str, namespace: str) -> dict[str, int]:
    """Messages on each of the run's topics: how much work one posted event fans out into."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await reader.start()
    await admin.start()
    try:
        topics = [t for t in await reader.topics() if t.startswith(f"{namespace}.")]
        described = await admin.describe_topics(topics)
        tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
        ends: dict[TopicPartition, int] = await reader.end_offsets(tps) if tps else {}
        sizes: dict[str, int] = {}
        for tp, end in ends.items():
            name = tp.topic.removeprefix(f"{namespace}.")
            sizes[name] = sizes.get(name, 0) + end
        return {k: v for k, v in sizes.items() if v}
    finally:
        await admin.close()
        await reader.stop()


async def wait_drained(bootstrap: str, namespace: str, timeout: float = 180) -> float:
    """Wait until every consumer group of the run has caught up with its topics; returns seconds waited."""
    started = time.monotonic()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    ends_reader = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await ends_reader.start()
    try:
        while time.monotonic() - started < timeout:
            groups = [g[0] for g in await admin.list_consumer_groups() if g[0].startswith(f"{namespace}.")]
            lag = 0
            for group in groups:
                committed = await admin.list_consumer_group_offsets(group)
                tps = [tp for tp in committed if not tp.topic.endswith(".dlq")]
                ends: dict[TopicPartition, int] = await ends_reader.end_offsets(tps)
                lag += sum(max(0, ends[tp] - committed[tp].offset) for tp in tps)
            if groups and lag == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.5)
        raise RuntimeError(f"consumer groups still lagging after {timeout:.0f}s")
    finally:
        await ends_reader.stop()
        await admin.close()


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


Hops = tuple[dict[str, float], dict[str, float], dict[str, float]]


async def hop_times(namespace: str) -> Hops:
    """When each customer's ping reached clm.events.v1, its request clm.messages.requested.v1 and its
    `queued` status clm.messages.status.v1: the `clm-produced-at-ms` header of each message."""
    topic = f"{namespace}.clm."
    events = await read_topic(topic + "events.v1", idle=2.0, timeout=60)
    requests = await read_topic(topic + "messages.requested.v1", idle=2.0, timeout=60)
    statuses = await read_topic(topic + "messages.status.v1", idle=2.0, timeout=60)
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
    at_queued = {
        m["value"]["customer_id"]: int(m["headers"][Headers.PRODUCED_AT_MS]) / 1000
        for m in statuses
        if m["value"]
        and m["value"].get("journey_id") == "bench-immediate"
        and m["value"].get("status") == "queued"
    }
    return at_event, at_request, at_queued


def report_latency(users: list[str], posted: dict[str, float], sink: TimedSink, hops: Hops) -> list[float]:
    """Print POST -> mail accepted, p50 and p99, in total and per hop; returns the totals (ms)."""
    at_event, at_request, at_queued = hops
    total, hop_ingest, hop_journey, hop_notifier = [], [], [], []
    hop_enqueue, hop_send = [], []
    for u in users:
        mail_at = sink.accepted_at[f"{u}@bench.example"]
        total.append((mail_at - posted[u]) * 1000)
        if u in at_event and u in at_request:
            hop_ingest.append((at_event[u] - posted[u]) * 1000)
            hop_journey.append((at_request[u] - at_event[u]) * 1000)
            hop_notifier.append((mail_at - at_request[u]) * 1000)
            if u in at_queued:
                hop_enqueue.append((at_queued[u] - at_request[u]) * 1000)
                hop_send.append((mail_at - at_queued[u]) * 1000)
    for name, values in (
        ("  total POST -> mail accepted", total),
        ("    ingest (POST -> clm.events.v1)", hop_ingest),
        ("    journey engine (event -> request)", hop_journey),
        ("    notifier (request -> mail accepted)", hop_notifier),
        ("      request -> queued in the send ledger", hop_enqueue),
        ("      queued -> mail accepted", hop_send),
    ):
        line(f"{name} p50", percentile(values, 50), "ms")
        line(f"{name} p99", percentile(values, 99), "ms")
    return total


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
            warmup = int(args.warmup_s * args.warmup_rate)
            users = [f"b{i:06d}" for i in range(args.customers + args.latency_customers + warmup)]
            await identify_all(c, platform, users)
            await asyncio.sleep(3)  # profiles reach the journey engine's projection

            # 0. warm-up, not measured: a broker is a long-running JVM, and a fresh one spends its first
            # minutes under load compiling, which a platform that has been running does not pay. Its
            # C2 threads, sampled from /proc: 15-20% of a core for the first ~100 s of load, under 5%
            # after; with 20 s at 150/s (the earlier default, a backlog on a slow host) they still took
            # 24% of a core while single posts were measured. The same 3,000 posts at 50/s take 60 s
            # and compile the pattern that is measured.
            if warmup:
                warm = users[-warmup:]
                started = time.time()
                await asyncio.to_thread(paced_load, platform.url("ingest"), warm, args.warmup_rate, 0.0)
                await wait_mails(sink, warm, timeout=300)
                await wait_drained(bootstrap, namespace)
                line(
                    f"warm-up, not measured: {warmup} single posts at {args.warmup_rate:.0f}/s, done after",
                    time.time() - started,
                    "s",
                )

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

            # 2. latency at half the maximum rate, in steady state: the burst's aftermath (statuses,
            # profiles, journeys) is worked off first. Twice: single posts, then SDK-style batches.
            rate = args.paced_rate or max_rate / 2
            paced = users[args.customers : args.customers + args.latency_customers]
            phases = {
                "single /v1/track posts": (paced[: len(paced) // 2], 0.0),
                f"/v1/batch every {args.flush_ms:.0f} ms, as SDKs flush": (
                    paced[len(paced) // 2 :],
                    args.flush_ms,
                ),
            }
            for n, (group, flush_ms) in enumerate(phases.values()):
                # A lead-in of the same load, not measured, runs on into the measured posts without
                # a pause: the figures are the steady state of that load, not its first seconds
                # (the broker's JIT compiles for each new pattern of requests).
                lead_in = [f"lead{n}-{i:06d}" for i in range(int(rate * args.lead_in_s))]
                await identify_all(c, platform, lead_in)
                await asyncio.sleep(3)
                drained = await wait_drained(bootstrap, namespace)
                line("  earlier load worked off by every consumer group after (setup)", drained, "s")
                ingest_url = platform.url("ingest")
                load = lead_in + group
                posted.update(await asyncio.to_thread(paced_load, ingest_url, load, rate, flush_ms))
                await wait_mails(sink, load, timeout=180)
                users += lead_in

        hops = await hop_times(namespace)
        p99_single = 0.0
        for label, (group, _) in phases.items():
            pace = "half the maximum rate" if not args.paced_rate else "a fixed rate (--paced-rate)"
            line(f"paced at {pace}, {label}", rate, "events/s")
            totals = report_latency(group, posted, sink, hops)
            p99_single = p99_single or percentile(totals, 99)
        fanout = await topic_sizes(bootstrap, namespace)
        posted_events = 2 * len(users)  # an identify and a ping each
        for name, n in sorted(fanout.items()):
            line(f"messages on {name} per posted event", n / posted_events)
        raw = await raw_smtp_rate(sink.port, args.customers)
        ratio("platform rate / raw aiosmtplib rate (same mails)", max_rate, raw)
        last_line("e2e_p99_ms", p99_single)
    finally:
        await asyncio.to_thread(platform.stop)
        await sink.stop()
        for name in ("ingest", "segmenter", "journey_engine", "notifier"):
            await drop_schema(url, f"{name}_{namespace}")
        await delete_test_topics(f"{namespace}.")


def pace_main(url: str, rate: float, flush_ms: float) -> None:
    users = [u for u in sys.stdin.read().split("\n") if u]
    posted = asyncio.run(PacedLoad(url, users, rate, flush_ms).run())
    print(json.dumps(posted), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pace", metavar="INGEST_URL", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=50.0, help=argparse.SUPPRESS)
    parser.add_argument("--customers", type=int, default=2000, help="customers in the maximum-rate burst")
    parser.add_argument(
        "--latency-customers", type=int, default=2000, help="customers in the paced phases (half each)"
    )
    parser.add_argument(
        "--flush-ms", type=float, default=100.0, help="flush interval of the SDK-style paced phase"
    )
    parser.add_argument(
        "--warmup-s", type=float, default=60.0, help="seconds of unmeasured single posts first (0: none)"
    )
    parser.add_argument("--warmup-rate", type=float, default=50.0, help="events/s of the warm-up")
    parser.add_argument(
        "--lead-in-s",
        type=float,
        default=10.0,
        help="seconds of each paced phase's own load run, unmeasured, right before its measured posts",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=0.0,
        help="rate of the paced phases instead of half the maximum (to see the latency floor)",
    )
    parsed = parser.parse_args()
    if parsed.pace:
        pace_main(parsed.pace, parsed.rate, parsed.flush_ms)
    else:
        asyncio.run(main(parsed))
