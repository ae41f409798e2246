"""Time parameters of the notifier's admin API: a time past the storable ones (1900-2999) is moved
into them, as it worked before (`since=0001-01-01T00:00:00Z` is no lower bound, `until=9999-...` no
upper bound, a `before` cursor pages from the range's end); only a time its offset takes past year 1
or 9999 (`0001-01-01T00:00:00+14:00`, which overflowed the database driver: a 500) is a 400 naming
the parameter, in the shape every field error has."""

from __future__ import annotations

from typing import Any

from tests.notifier.conftest import ADMIN, request

NO_UTC = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]
# Before or past every storable time, but times.
EARLY = [
    "0001-01-01T00:00:00Z",
    "1800-01-01T00:00:00Z",
    "1899-12-31T23:59:59+00:00",
    "0001-01-01T00:00:00-14:00",
]
LATE = ["9999-12-31T23:59:59Z", "3000-01-01T00:00:00+00:00", "9999-12-31T23:59:59+14:00"]
RANGE_ERROR = {"field": "", "rule": "range", "message": "must be a time in UTC between years 1 and 9999"}


def range_error(field: str) -> dict[str, Any]:
    return {
        "error": "invalid_request",
        "message": f"`{field}` is out of range",
        "errors": [{**RANGE_ERROR, "field": field}],
    }


async def test_a_time_without_utc_is_a_400_naming_the_parameter(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        for at in NO_UTC:
            r = await h.client.get("/v1/customers/c1/messages", params={"before": f"{at}|m1"}, headers=ADMIN)
            assert (r.status_code, r.json()) == (400, range_error("before")), at
            # The audit log's filters (`shared.audit`, every service's).
            for name in ("since", "until"):
                r = await h.client.get("/v1/audit", params={name: at}, headers=ADMIN)
                assert (r.status_code, r.json()) == (400, range_error(name)), (name, at)


async def test_a_time_past_the_storable_ones_is_clamped_to_them(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(
            {
                "id": "note",
                "name": "Note",
                "channel": "in_app",
                "default_locale": "en",
                "variants": {"en": {"title": "Hi", "body": "Hello"}},
            }
        )
        await h.publish(request("m-c1", "c1", "in_app", "note", category="transactional"))
        await h.wait_status("m-c1", "delivered")

        async def audit(**params: str) -> list[str]:
            r = await h.client.get("/v1/audit", params=params, headers=ADMIN)
            assert r.status_code == 200, (params, r.text)
            return [e["path"] for e in r.json()["entries"]]

        async def page(before: str) -> list[str]:
            r = await h.client.get("/v1/customers/c1/messages", params={"before": before}, headers=ADMIN)
            assert r.status_code == 200, (before, r.text)
            return [m["message_id"] for m in r.json()["messages"]]

        everything = ["/v1/templates"]
        for at in EARLY:
            assert await audit(since=at) == everything, at  # no lower bound
            assert await audit(until=at) == [], at  # before anything stored
            assert await page(f"{at}|m") == [], at
        for at in LATE:
            assert await audit(until=at) == everything, at  # no upper bound
            assert await audit(since=at) == [], at
            assert await page(f"{at}|m") == ["m-c1"], at
        assert await audit(since=EARLY[0], until=LATE[0]) == everything


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
