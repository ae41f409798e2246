"""/v1/templates: what a template save, preview or test send refuses up front."""

from __future__ import annotations

from typing import Any

from tests.notifier.conftest import ADMIN, SMS_TEMPLATE


async def test_preview_and_test_send_refuse_traits_or_journey_that_are_not_objects(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
        # `**data["traits"]` raised TypeError outside the preview's try: a 500.
        r = await h.client.post(
            "/v1/templates/sms-data/preview", headers=ADMIN, json={"data": {"traits": ["vip"]}}
        )
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("data.traits", "object")]
        assert "not an array" in r.json()["errors"][0]["message"]

        # The test send answered 202 and the message failed later ("internal error: TypeError").
        r = await h.client.post(
            "/v1/templates/sms-data/test-send",
            headers=ADMIN,
            json={"recipient": {"phone": "+4790000001"}, "data": {"journey": "welcome"}},
        )
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("data.journey", "object")]
        assert h.twilio.requests == []

        ok = await h.client.post(
            "/v1/templates/sms-data/preview", headers=ADMIN, json={"data": {"traits": {"name": "Ada"}}}
        )
        assert ok.status_code == 200 and ok.json()["parts"] == {"body": "Hi Ada"}, ok.text


async def test_a_template_with_an_unknown_filter_is_refused_naming_the_part_and_filter(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        body = {
            **SMS_TEMPLATE,
            "id": "sms-filter",
            "variants": {"en": {"body": "ok"}, "fr": {"body": "Salut {{ traits.name | upcase2 }}"}},
        }
        # Saved fine before; every send then failed ("unknown filter").
        r = await h.client.post("/v1/templates", headers=ADMIN, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["errors"] == [
            {
                "field": "variants.fr.body",
                "rule": "liquid",
                "message": "unknown filter 'upcase2' (line 1, column 23)",
            }
        ]
        assert (await h.client.get("/v1/templates/sms-filter", headers=ADMIN)).status_code == 404

        await h.create_template(SMS_TEMPLATE)
        update = {k: v for k, v in SMS_TEMPLATE.items() if k != "id"}
        update["variants"] = {"en": {"body": "{{ traits.name | upcase | shout }}"}}
        r = await h.client.put("/v1/templates/sms-data", headers=ADMIN, json=update)
        assert r.status_code == 400, r.text
        assert [(e["field"], e["message"]) for e in r.json()["errors"]] == [
            ("variants.en.body", "unknown filter 'shout' (line 1, column 26)")
        ]
        kept = (await h.client.get("/v1/templates/sms-data", headers=ADMIN)).json()
        assert kept["version"] == 1 and kept["variants"] == SMS_TEMPLATE["variants"]


async def test_every_template_change_is_announced_for_journeys_to_check_against(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Saved, changed and deleted templates go out on clm.templates.v1 (keyed by id, with their
    channel), in the transaction that changes them; a restart re-announces the templates there are."""
    from shared.contracts import TEMPLATES
    from tests.support import read_topic

    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
        changed = {k: v for k, v in SMS_TEMPLATE.items() if k != "id"} | {"name": "SMS_TEMPLATE 2"}
        r = await h.client.put("/v1/templates/sms-data", headers=ADMIN, json=changed)
        assert r.status_code == 200, r.text
        assert (await h.client.delete("/v1/templates/sms-data", headers=ADMIN)).status_code == 204
        await h.create_template({**SMS_TEMPLATE, "id": "kept"})
        topic = h.settings.topic(TEMPLATES.name)

        def states(msgs: list[dict[str, Any]], key: str) -> list[tuple[str, int, bool]]:
            # In order per template (its key's partition); templates' partitions interleave.
            return [
                (m["value"]["channel"], m["value"]["version"], m["value"]["deleted"])
                for m in msgs
                if m["key"] == key
            ]

        got = await read_topic(topic, until=lambda ms: len(ms) >= 4, timeout=15)
        assert states(got, "sms-data") == [("sms", 1, False), ("sms", 2, False), ("sms", 2, True)]
        assert states(got, "kept") == [("sms", 1, False)]
    async with start_notifier() as h2:  # the same schema and topics: a restart
        assert h2.settings.topic(TEMPLATES.name) == topic
        got = await read_topic(topic, until=lambda ms: len(ms) >= 5, timeout=15)
        assert states(got, "kept") == [("sms", 1, False), ("sms", 1, False)]
        assert len(states(got, "sms-data")) == 3  # a deleted template is not announced again


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_a_test_send_refuses_data_the_ledger_could_not_store(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """As `POST /v1/messages` does: data nested past 64 levels (writing the ledger row failed: a 500)
    or an integer past 64 bits (queued, then unwritable) is a 400 naming `data`; nothing is queued."""
    from sqlalchemy import text

    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
        for data, problem in (
            ({"x": nested(300)}, "more than 64 levels deep"),
            ({"x": 2**70}, "must fit in 64 bits"),
        ):
            r = await h.client.post(
                "/v1/templates/sms-data/test-send",
                headers=ADMIN,
                json={"recipient": {"phone": "+4790000002"}, "data": data},
            )
            assert r.status_code == 400, r.text
            (error,) = r.json()["errors"]
            assert error["field"] == "data" and problem in error["message"], error
        ok = await h.client.post(
            "/v1/templates/sms-data/test-send",
            headers=ADMIN,
            json={"recipient": {"phone": "+4790000002"}, "data": {"x": nested(60)}},
        )
        assert ok.status_code == 202, ok.text
        async with h.platform.engine.connect() as conn:
            queued = await conn.scalar(text("SELECT count(*) FROM send_ledger"))
        assert queued == 1
