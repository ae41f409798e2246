"""Recommendations in templates (issue 9): `data.recommendations` of a request is the Liquid variable
`recommendations` (`{% for p in recommendations.cross_sell limit: 3 %}`), and a preview of a real
customer uses the lists the contact projection keeps from ProfileChanged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared.contracts import PROFILES, ProfileChanged
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually

CROSS_SELL = {
    "id": "cross-sell",
    "name": "Cross-sell",
    "channel": "email",
    "default_locale": "en",
    "variants": {
        "en": {
            "subject": "For your {{ recommendations.cross_sell[0].name }}",
            "html": "<html><body><ul>{% for p in recommendations.cross_sell limit: 3 %}"
            '<li><a href="{{ p.url }}">{{ p.name }}</a> {{ p.price }} ({{ p.reason }})</li>{% endfor %}</ul>'
            "{% if recommendations.upsell.size > 0 %}<p>Upgrade: {{ recommendations.upsell[0].name }}</p>"
            "{% endif %}</body></html>",
            "text": "{% for p in recommendations.cross_sell limit: 3 %}{{ p.name }};{% endfor %}",
        }
    },
}


def product(name: str, price: str) -> dict[str, Any]:
    pid = name.lower().replace(" ", "-")
    return {
        "product_id": pid,
        "name": name,
        "price": price,
        "url": f"https://shop.example.com/p/{pid}",
        "reason": "bought with Camera by 3 customers",
    }


LISTS = {
    "cross_sell": [
        product(n, p) for n, p in [("Memory card", "20"), ("Bag", "45"), ("Tripod", "60"), ("Lens", "250")]
    ],
    "upsell": [product("Camera Pro", "600")],
}


async def test_request_data_recommendations_render_as_liquid_variable(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(CROSS_SELL)
        await h.profile("c1", {"email": "ada@example.com", "first_name": "Ada"})
        await h.publish(
            request(
                "m-reco-1",
                "c1",
                "email",
                "cross-sell",
                category="transactional",
                recipient={"email": "ada@example.com"},
                data={"recommendations": LISTS},
            )
        )
        await h.wait_status("m-reco-1", "delivered")
        mail = h.sink.messages[0].message
        assert mail["Subject"] == "For your Memory card"
        text = mail.get_body(preferencelist=("plain",)).get_content()
        assert text.strip() == "Memory card;Bag;Tripod;"  # top 3 only
        html = mail.get_body(preferencelist=("html",)).get_content()
        assert "Memory card</a> 20 (bought with Camera by 3 customers)" in html
        assert "Lens" not in html and "Upgrade: Camera Pro" in html


async def test_preview_of_a_customer_uses_the_projected_lists(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(CROSS_SELL)
        await publish_profile(h, "c2", LISTS)

        async def preview() -> dict[str, Any] | None:
            r = await h.client.post(
                "/v1/templates/cross-sell/preview", headers=ADMIN, json={"customer_id": "c2"}
            )
            return r.json() if r.status_code == 200 else None

        shown = await eventually(preview, timeout=15)
        assert shown["parts"]["subject"] == "For your Memory card"
        assert shown["parts"]["text"].strip() == "Memory card;Bag;Tripod;"
        # Preview data given explicitly wins over the projection.
        mine = {"cross_sell": [product("Beans", "12")], "upsell": []}
        r = await h.client.post(
            "/v1/templates/cross-sell/preview",
            headers=ADMIN,
            json={"customer_id": "c2", "data": {"recommendations": mine}},
        )
        assert r.status_code == 200 and r.json()["parts"]["text"].strip() == "Beans;"
        # No lists at all (a request without them): the loops render nothing, no undefined-variable error.
        text_only = {**CROSS_SELL, "id": "loop-only"}
        text_only["variants"] = {
            "en": {
                "subject": "s",
                "html": "<p>x</p>",
                "text": "{% for p in recommendations.upsell %}{{ p.name }}{% endfor %}.",
            }
        }
        await h.create_template(text_only)
        r = await h.client.post("/v1/templates/loop-only/preview", headers=ADMIN, json={"data": {}})
        assert r.status_code == 200 and r.json()["parts"]["text"].strip() == "."


async def publish_profile(h: Harness, cid: str, lists: dict[str, Any]) -> None:
    change = ProfileChanged(
        event_id=f"p-{cid}-reco",
        customer_id=cid,
        kind="traits_changed",
        occurred_at=datetime.now(UTC),
        traits={"email": f"{cid}@example.com"},
        recommendations=lists,
    )
    await h.platform.producer.publish(PROFILES.name, cid, change)
