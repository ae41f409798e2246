"""Time parameters of the notifier's admin API: a time outside what can be stored (1900-2999, and
the extremes `0001-01-01T00:00:00+14:00`, `9999-12-31T23:59:59-14:00` that overflowed the database
driver: a 500) is a 400 naming the parameter, in the shape every field error has."""

from __future__ import annotations

from typing import Any

from tests.notifier.conftest import ADMIN, request

OUT_OF_RANGE = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "1899-12-31T23:59:59+00:00",
    "3000-01-01T00:00:00+00:00",
]
RANGE_ERROR = {"field": "", "rule": "range", "message": "must be from 1900-01-01 to 2999-12-31 (UTC)"}


def range_error(field: str) -> dict[str, Any]:
    return {
        "error": "invalid_request",
        "message": f"`{field}` is out of range",
        "errors": [{**RANGE_ERROR, "field": field}],
    }


async def test_a_time_out_of_range_is_a_400_naming_the_parameter(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        for at in OUT_OF_RANGE:
            r = await h.client.get("/v1/customers/c1/messages", params={"before": f"{at}|m1"}, headers=ADMIN)
            assert (r.status_code, r.json()) == (400, range_error("before")), at
            # The audit log's filters (`shared.audit`, every service's).
            for name in ("since", "until"):
                r = await h.client.get("/v1/audit", params={name: at}, headers=ADMIN)
                assert (r.status_code, r.json()) == (400, range_error(name)), (name, at)


async def test_a_cursor_is_a_time_with_its_offset_and_pages_as_given(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        for before in ("2026-01-01T00:00:00|m1", "yesterday|m1", "|m1"):
            r = await h.client.get("/v1/customers/c1/messages", params={"before": before}, headers=ADMIN)
            assert r.status_code == 400, before
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("before", "cursor")]
        await h.create_template(
            {
                "id": "note",
                "name": "Note",
                "channel": "in_app",
                "default_locale": "en",
                "variants": {"en": {"title": "Hi", "body": "Hello"}},
            }
        )
        for n in (1, 2):
            await h.publish(request(f"m-p{n}", "c1", "in_app", "note", category="transactional"))
            await h.wait_status(f"m-p{n}", "delivered")
        first = (await h.client.get("/v1/customers/c1/messages", params={"limit": 1}, headers=ADMIN)).json()
        assert [m["message_id"] for m in first["messages"]] == ["m-p2"]
        # Any zone: the same instant pages the same.
        at, _, message_id = first["next_before"].partition("|")
        for cursor in (first["next_before"], f"{at.replace('+00:00', 'Z')}|{message_id}"):
            page = await h.client.get(
                "/v1/customers/c1/messages", params={"limit": 1, "before": cursor}, headers=ADMIN
            )
            assert [m["message_id"] for m in page.json()["messages"]] == ["m-p1"], cursor
        r = await h.client.get("/v1/audit", params={"since": "2020-01-01T00:00:00+00:00"}, headers=ADMIN)
        assert r.status_code == 200 and [e["path"] for e in r.json()["entries"]] == ["/v1/templates"]
