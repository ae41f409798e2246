"""An event posted upstream becomes a timely, personalized message: four processes, a real broker,
database and mail server."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from tests.e2e.conftest import WRITE_KEY, Platform, activate
from tests.support import eventually, read_topic


async def setup_welcome_journey(c: httpx.AsyncClient, p: Platform, suffix: str) -> str:
    r = await c.put(
        f"{p.url('notifier')}/v1/subscription-topics/onboarding",
        headers=p.admin,
        json={"name": "Onboarding tips", "channels": ["email"], "default_subscribed": True},
    )
    assert r.status_code == 200, r.text
    r = await c.post(
        f"{p.url('notifier')}/v1/templates",
        headers=p.admin,
        json={
            "id": f"welcome-{suffix}",
            "name": "Welcome",
            "channel": "email",
            "variants": {
                "en": {
                    "subject": "Welcome, {{ traits.first_name }}!",
                    "html": "<p>Hi {{ traits.first_name }}, glad you joined.</p>"
                    '<a href="{% unsubscribe_link %}">Unsubscribe</a>',
                    "text": "Hi {{ traits.first_name }}, glad you joined. "
                    "Unsubscribe: {% unsubscribe_link %}",
                }
            },
        },
    )
    assert r.status_code in (200, 201), r.text
    r = await c.post(
        f"{p.url('segmenter')}/v1/segments",
        headers=p.admin,
        json={
            "name": f"New sign-ups {suffix}",
            # the cohort filter keeps tests sharing one platform out of each other's segments
            "definition": {
                "performed": "Signed Up",
                "where": [{"property": "cohort", "op": "equals", "value": suffix}],
                "within": "7d",
            },
        },
    )
    assert r.status_code == 201, r.text
    segment_id = r.json()["id"]
    journey: dict[str, Any] = {
        "definition": {
            "name": "Welcome",
            "entry": {"type": "segment", "segment_id": segment_id, "change": "entered"},
            "nodes": [
                {"id": "start", "type": "entry"},
                {
                    "id": "hello",
                    "type": "send",
                    "channel": "email",
                    "template_id": f"welcome-{suffix}",
                    "subscription_topic": "onboarding",
                },
                {
                    "id": "sent",
                    "type": "wait_message",
                    "send_node": "hello",
                    "statuses": ["sent"],
                    "timeout": "P1D",
                },
                {"id": "done", "type": "exit"},
            ],
            "edges": [
                {"from": "start", "to": "hello"},
                {"from": "hello", "to": "sent"},
                {"from": "sent", "to": "done", "branch": "matched"},
                {"from": "sent", "to": "done", "branch": "timeout"},
            ],
        },
    }
    await activate(c, p, f"welcome-{suffix}", journey["definition"])
    return segment_id


async def sign_up(
    c: httpx.AsyncClient, p: Platform, user_id: str, email_address: str, first_name: str, cohort: str
) -> None:
    batch = {
        "batch": [
            {
                "type": "identify",
                "messageId": f"identify-{user_id}",
                "userId": user_id,
                "traits": {"email": email_address, "first_name": first_name, "timezone": "Europe/Paris"},
            },
            {
                "type": "track",
                "messageId": f"signed-up-{user_id}",
                "userId": user_id,
                "event": "Signed Up",
                "properties": {"method": "email", "cohort": cohort},
            },
        ]
    }
    r = await c.post(f"{p.url('ingest')}/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert r.status_code == 200, r.text


async def journey_instances(c: httpx.AsyncClient, p: Platform, journey_id: str) -> list[dict[str, Any]]:
    r = await c.get(f"{p.url('journey_engine')}/v1/journeys/{journey_id}/instances", headers=p.admin)
    assert r.status_code == 200, r.text
    return list(r.json()["instances"])


async def test_sign_up_gets_a_personalized_welcome_email_with_an_unsubscribe_link(platform: Platform) -> None:
    suffix = uuid.uuid4().hex[:6]
    user, address = f"ada-{suffix}", f"ada-{suffix}@example.com"
    async with httpx.AsyncClient(timeout=10) as c:
        segment_id = await setup_welcome_journey(c, platform, suffix)
        await sign_up(c, platform, user, address, "Ada", suffix)

        mails = await eventually(lambda: platform.mails_to(address), timeout=30, interval=0.2)
        assert len(mails) == 1
        mail = mails[0]
        assert mail["Subject"] == "Welcome, Ada!"
        text = mail.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        assert "Hi Ada, glad you joined." in text
        assert re.search(r"https?://\S+/u/\S+", text), text
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

        # the customer is in the segment, and the journey saw the `sent` status of its message
        r = await c.get(f"{platform.url('segmenter')}/v1/customers/{user}", headers=platform.admin)
        assert r.status_code == 200, r.text
        assert segment_id in [s["segment_id"] for s in r.json()["segments"]]

        async def journey_done() -> list[dict[str, Any]]:
            return [
                i
                for i in await journey_instances(c, platform, f"welcome-{suffix}")
                if i["status"] != "active"
            ]

        done = await eventually(journey_done, timeout=20, interval=0.3)
        assert len(done) == 1
        assert done[0]["customer_id"] == user

        # the profile shows the onboarding stage and the message with its outcome
        async def profile_with_message() -> dict[str, Any] | None:
            r = await c.get(f"{platform.url('segmenter')}/v1/customers/{user}", headers=platform.admin)
            body: dict[str, Any] = r.json()
            messages = body.get("engagement", {}).get("recent_messages", [])
            return body if any(m["template_id"] == f"welcome-{suffix}" for m in messages) else None

        profile = await eventually(profile_with_message, timeout=20, interval=0.3)
        assert profile["lifecycle"]["stage"] == "onboarding"
        message = next(
            m for m in profile["engagement"]["recent_messages"] if m["template_id"] == f"welcome-{suffix}"
        )
        assert message["channel"] == "email"
        assert message["status"] in ("sent", "delivered")

        # every hop passed the chain's correlation id on: the welcome's statuses carry the id of the
        # sign-up event that put the customer in the segment (the segment entry, the journey's request)
        def welcome_sent(messages: list[dict[str, Any]]) -> bool:
            return any(
                m["value"]["customer_id"] == user and m["value"]["status"] in ("sent", "delivered")
                for m in messages
            )

        statuses = await read_topic(platform.status_topic(), until=welcome_sent, timeout=20)
        mine = [m for m in statuses if m["value"]["customer_id"] == user]
        assert {m["value"]["status"] for m in mine} >= {"queued", "sent"}
        assert {m["headers"]["clm-correlation-id"] for m in mine} <= {f"identify-{user}", f"signed-up-{user}"}
        assert len({m["headers"]["clm-correlation-id"] for m in mine}) == 1
