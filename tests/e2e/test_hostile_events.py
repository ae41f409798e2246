"""What ingest accepts, every consumer can process: random but valid Segment calls full of hostile
values (unicode, huge and tiny numbers, dates at the ends of time, deep nesting, junk traits) go
through the four processes with a time-based segment, a welcome journey and its email template
active, and no message is dead-lettered or fails its handler.

Found this way, before the fixes: events holding U+0000 or stamped 0001-01-01 were accepted and then
failed every later event of their customer in the segmenter; a trait of 9999-12-31 in a time-based
rule did the same; nesting past 254 levels was accepted and failed in every consumer.
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

import httpx

from tests.e2e.conftest import WRITE_KEY, Platform, activate, email_template
from tests.support import eventually, read_topic

SEED = 20261129
N_BATCHES = 60

TEXT = [
    "",
    "plain",
    "Ünïcödé ñ",
    "日本語のテキスト",
    "emoji 😀🚀",
    "‮right-to-left",
    "a\u0301\u0302",
    "back\\u0000slash",
    "'; DROP TABLE customers; --",
    "{{ traits.email }}",
    "x" * 2000,
]
NUMBERS: list[Any] = [0, -0.0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**70, 1e308, -1e308, 5e-324, 0.1]
DATES = [
    "1900-01-01T00:00:00Z",
    "2999-12-31T23:59:59Z",
    "2026-02-29",
    "9999-12-31",
    "9999-12-31T23:00:00-14:00",
    "0001-01-01",
    "2026-11-29T12:00:00+05:45",
    "not a date",
]
ZONES = ["Europe/Oslo", "Mars/Base", "a" * 300, "", "UTC", "../etc/passwd"]


def scalar(rnd: random.Random) -> Any:
    return rnd.choice([None, True, False, rnd.choice(TEXT), rnd.choice(NUMBERS), rnd.choice(DATES)])


def value(rnd: random.Random, depth: int = 0) -> Any:
    roll = rnd.random()
    if depth < 12 and roll < 0.2:
        return {rnd.choice(TEXT)[:30] or "k": value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))}
    if depth < 12 and roll < 0.3:
        return [value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return scalar(rnd)


def call(rnd: random.Random, user: str) -> dict[str, Any]:
    base: dict[str, Any] = {"userId": user, "messageId": f"{user}-{rnd.getrandbits(48)}"}
    if rnd.random() < 0.3:
        base["anonymousId"] = rnd.choice(TEXT)[:40] or "anon"
    if rnd.random() < 0.5:
        base["timestamp"] = rnd.choice(DATES)
    if rnd.random() < 0.2:
        base["context"] = {"ip": rnd.choice(TEXT), "nested": value(rnd)}
    kind = rnd.choice(["track", "track", "identify", "page", "group", "alias"])
    if kind == "track":
        props = {rnd.choice(TEXT)[:20]: value(rnd) for _ in range(rnd.randint(0, 5))}
        props.update(
            rnd.choice([{}, {"revenue": scalar(rnd)}, {"cart_id": scalar(rnd)}, {"score": scalar(rnd)}])
        )
        event = rnd.choice(
            ["Signed Up", "Order Completed", "Product Added", "NPS Survey Answered", *TEXT[1:5]]
        )
        return {**base, "type": "track", "event": event, "properties": props}
    if kind == "identify":
        traits = {
            "email": rnd.choice([f"{user}@example.com", *TEXT[:6], 42]),
            "first_name": rnd.choice(TEXT),
            "renews_at": rnd.choice(DATES),
            "timezone": rnd.choice(ZONES),
            rnd.choice(TEXT)[:20] or "t": value(rnd),
        }
        return {**base, "type": "identify", "traits": traits}
    if kind == "page":
        return {**base, "type": "page", "name": rnd.choice(TEXT)[:100], "properties": {"url": scalar(rnd)}}
    if kind == "group":
        return {
            **base,
            "type": "group",
            "groupId": rnd.choice(TEXT)[:40] or "g",
            "traits": {"plan": scalar(rnd)},
        }
    return {**base, "type": "alias", "previousId": rnd.choice([f"{user}-old", *TEXT[1:5]])}


async def consumed(c: httpx.AsyncClient, p: Platform, service: str) -> float:
    """The events consumed by `service`'s handler of clm.events.v1, from its /metrics."""
    text = (await c.get(f"{p.url(service)}/metrics")).text
    pattern = r'clm_consumer_messages_total\{[^}]*topic="[^"]*clm\.events\.v1"[^}]*\} ([0-9.e+]+)'
    return sum(float(m) for m in re.findall(pattern, text))


async def handler_errors(c: httpx.AsyncClient, p: Platform, service: str) -> float:
    text = (await c.get(f"{p.url(service)}/metrics")).text
    return sum(float(m) for m in re.findall(r"clm_consumer_handler_errors_total\{[^}]*\} ([0-9.e+]+)", text))


async def test_every_event_ingest_accepts_is_processed_everywhere(platform: Platform) -> None:
    rnd = random.Random(SEED)
    suffix = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(timeout=30) as c:
        await email_template(c, platform, f"hostile-{suffix}", "Hi {{ traits.first_name }}")
        r = await c.post(
            f"{platform.url('segmenter')}/v1/segments",
            headers=platform.admin,
            json={
                "name": "Renewing",
                "definition": {"trait": "renews_at", "op": "within", "duration": "30d"},
            },
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            f"{platform.url('segmenter')}/v1/segments",
            headers=platform.admin,
            json={"name": "Signed up", "definition": {"performed": "Signed Up", "within": "7d"}},
        )
        assert r.status_code == 201, r.text
        signed_up = r.json()["id"]
        await activate(
            c,
            platform,
            f"hostile-{suffix}",
            {
                "name": "Hostile welcome",
                "entry": {"type": "segment", "segment_id": signed_up, "change": "entered"},
                "nodes": [
                    {"id": "start", "type": "entry"},
                    {"id": "send", "type": "send", "channel": "email", "template_id": f"hostile-{suffix}"},
                    {"id": "done", "type": "exit"},
                ],
                "edges": [{"from": "start", "to": "send"}, {"from": "send", "to": "done"}],
            },
        )

        accepted = 0
        for b in range(N_BATCHES):
            users = [f"h{suffix}-{b}-{i}" for i in range(rnd.randint(1, 4))]
            batch = [call(rnd, rnd.choice(users)) for _ in range(rnd.randint(1, 12))]
            r = await c.post(
                f"{platform.url('ingest')}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, "")
            )
            assert r.status_code in (200, 207, 400), r.text
            accepted += r.json()["accepted"]
        assert accepted > N_BATCHES * 6 * 0.4, accepted  # most calls are valid: the test means something

        for service in ("segmenter", "journey_engine"):

            async def caught_up(service: str = service) -> bool:
                return await consumed(c, platform, service) >= accepted

            await eventually(caught_up, timeout=60, interval=0.5)
        for service in ("segmenter", "journey_engine", "notifier"):
            assert await handler_errors(c, platform, service) == 0, service

    namespace = platform.processes.namespace
    for topic in (
        "clm.events.v1",
        "clm.profiles.v1",
        "clm.segment-membership.v1",
        "clm.messages.requested.v1",
    ):
        dead = await read_topic(f"{namespace}.{topic}.dlq", idle=1.0, timeout=5)
        assert dead == [], (topic, [m["headers"] for m in dead][:3])
