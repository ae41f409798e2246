"""Message performance per template, journey node and channel: what was sent, delivered, bounced,
suppressed, opened, clicked and unsubscribed, with rates; filters and clear 4xx."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from tests.notifier.conftest import ADMIN, Harness
from tests.notifier.test_email import email_request, setup

DATA = {"traits": {"first_name": "Ro"}, "event": {"properties": {"total": 3}}}


async def report(h: Harness, **params: Any) -> dict[str, Any]:
    response = await h.client.get("/v1/reports/messages", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_templates_sends_opens_clicks_bounces_and_opt_outs_add_up(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        h.sink.reject.add("gone@example.com")
        for i, address in enumerate(["a@example.com", "b@example.com", "gone@example.com"]):
            await h.publish(
                email_request(
                    f"m-r-{i}", f"r{i}", recipient={"email": address}, node_id=f"n-{i % 2}", data=DATA
                )
            )
        for i in range(3):
            await h.wait_status(f"m-r-{i}", "bounced" if i == 2 else "delivered")
        first = next(m for m in h.sink.messages if m.envelope_to == ["a@example.com"]).message
        html = first.get_body(preferencelist=("html",)).get_content()
        pixel = re.search(r'<img src="(http://testserver/t/o/[^"]+)"', html)
        click = re.search(r'href="(http://testserver/t/c/[^"]+)"', html)
        assert pixel and click
        await h.client.get(urlsplit(pixel.group(1)).path)
        await h.client.get(urlsplit(pixel.group(1)).path)  # twice: one opened message
        await h.client.get(urlsplit(click.group(1)).path)
        unsubscribe = str(first["List-Unsubscribe"]).strip("<>")
        await h.client.post(urlsplit(unsubscribe).path, data={"List-Unsubscribe": "One-Click"})
        await h.wait_status("m-r-0", "unsubscribed")
        await h.publish(email_request("m-r-3", "r0", recipient={"email": "a@example.com"}, data=DATA))
        await h.wait_status("m-r-3", "suppressed")

        body = await report(h)
        assert body["group_by"] == "template" and body["to"] >= body["from"]
        (welcome,) = body["groups"]
        counts = {k: welcome[k] for k in ("requested", "sent", "delivered", "bounced", "suppressed")}
        assert (welcome["template_id"], welcome["channel"]) == ("welcome", "email")
        assert counts == {"requested": 4, "sent": 3, "delivered": 2, "bounced": 1, "suppressed": 1}
        assert (welcome["opened"], welcome["clicked"], welcome["unsubscribed"]) == (1, 1, 1)
        assert (welcome["failed"], welcome["pending"], welcome["complained"]) == (0, 0, 0)
        assert welcome["rates"] == {
            "delivery": round(2 / 3, 4),
            "bounce": round(1 / 3, 4),
            "open": 0.5,
            "click": 0.5,
            "click_to_open": 1.0,
            "unsubscribe": 0.5,
            "complaint": 0.0,
        }
        assert body["total"]["requested"] == 4

        nodes = (await report(h, group_by="node", journey_id="j-welcome"))["groups"]
        assert sorted((g["node_id"], g["requested"], g["opened"]) for g in nodes) == [
            ("n-0", 2, 1),
            ("n-1", 1, 0),
            ("n-email", 1, 0),  # the suppressed one, asked for by another node
        ]
        assert (await report(h, channel="sms"))["groups"] == []
        nothing = await report(h, template_id="other")
        assert nothing["groups"] == [] and nothing["total"]["rates"]["open"] is None


async def test_bad_report_parameters_are_named(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        for params, field in (
            ({"group_by": "colour"}, "group_by"),
            ({"from": "2026-02-01", "to": "2026-01-01"}, "to"),
            ({"from": "0001-01-01"}, "from"),
            ({"limit": 0}, "limit"),
            ({"channel": "fax"}, "channel"),
        ):
            response = await h.client.get("/v1/reports/messages", params=params, headers=ADMIN)
            assert response.status_code == 400, (params, response.text)
            assert field in {e["field"].split(".")[-1] for e in response.json()["errors"]}, response.text
        assert (await h.client.get("/v1/reports/messages")).status_code == 401
