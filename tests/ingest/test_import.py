"""Bulk backfill: NDJSON in (streamed, gzip or not), progress and a summary out; same validation and
dedupe as the tracking API; historical timestamps kept; the CLI streams a file through it."""

from __future__ import annotations

import asyncio
import gzip
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from services.ingest import backfill
from services.ingest.api.body import GzipStream
from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CustomerEvent
from shared.http import ApiError
from tests.ingest.conftest import ADMIN, AUTH, WRITE_KEY, events_on_topic
from tests.ingest.served import served
from tests.support import running

HISTORY = datetime(2024, 6, 1, 8, 30, tzinfo=UTC)


def ndjson(rows: list[object]) -> bytes:
    return b"\n".join(orjson.dumps(r) for r in rows) + b"\n"


def orders(n: int) -> list[object]:
    return [
        {
            "type": "track",
            "userId": f"c{i % 7}",
            "event": "Order Completed",
            "properties": {"total": i},
            "timestamp": (HISTORY + timedelta(minutes=i)).isoformat(),
        }
        for i in range(n)
    ]


def summary_of(body: bytes) -> dict[str, object]:
    lines = [orjson.loads(line) for line in body.splitlines() if line.strip()]
    assert lines[-1]["type"] == "summary"
    assert all(line["type"] == "progress" for line in lines[:-1])
    result: dict[str, object] = lines[-1]
    return result


async def test_import_validates_dedupes_and_keeps_history(
    client: httpx.AsyncClient, settings: IngestSettings, clock: ManualClock
) -> None:
    rows: list[object] = [
        *orders(3),
        {
            "type": "identify",
            "userId": "c1",
            "traits": {"plan": "gold"},
            "messageId": "trait-1",
            "originalTimestamp": HISTORY.isoformat(),
            "sentAt": (HISTORY + timedelta(days=400)).isoformat(),
        },
        {"type": "track", "userId": "c1", "event": "No Time"},
        {"type": "track", "event": "No One", "timestamp": HISTORY.isoformat()},
        # No consumer could store it: refused here, never published.
        {"type": "track", "userId": "c1", "event": "Nul\x00", "timestamp": HISTORY.isoformat()},
    ]
    body = (
        ndjson(rows)
        + b"\n{broken json\n"
        + orjson.dumps(
            {"type": "page", "userId": "x", "name": "y" * 40_000, "timestamp": HISTORY.isoformat()}
        )
    )
    response = await client.post("/v1/import", content=body, headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    summary = summary_of(response.content)
    assert summary["complete"] is True
    assert (summary["accepted"], summary["published"], summary["duplicates"], summary["rejected"]) == (
        4,
        4,
        0,
        5,
    )
    errors = {(e["line"], e["field"], e["rule"]) for e in summary["errors"]}  # type: ignore[attr-defined]
    assert errors == {
        (5, "timestamp", "required"),
        (6, "userId", "required_one_of"),
        (7, "event", "no_nul_character"),
        (9, "line", "json_invalid"),
        (10, "line", "max_size"),
    }

    events = [CustomerEvent.model_validate(m["value"]) for m in await events_on_topic(settings, count=4)]
    assert {e.source for e in events} == {"backfill"}
    assert sorted(e.timestamp for e in events if e.event) == [
        HISTORY + timedelta(minutes=i) for i in range(3)
    ]
    identify = next(e for e in events if e.type == "identify")
    assert identify.timestamp == HISTORY  # no skew correction on a historical import
    assert all(e.received_at == clock.now() for e in events)

    # The same file again (with a write key, gzip'ed): every valid line is recognized, nothing republished.
    again = await client.post(
        "/v1/import", content=gzip.compress(body), headers={"Content-Encoding": "gzip"}, auth=AUTH
    )
    summary = summary_of(again.content)
    assert (summary["accepted"], summary["published"], summary["duplicates"]) == (4, 0, 4)
    assert len(await events_on_topic(settings)) == 4


async def test_cli_streams_a_file_with_progress(make_settings: object, tmp_path: Path) -> None:
    settings: IngestSettings = make_settings(  # type: ignore[operator]
        IngestSettings, write_keys=[WRITE_KEY], import_chunk_events=200, import_progress_interval_s=0.0
    )
    path = tmp_path / "orders.ndjson"
    path.write_bytes(ndjson([*orders(1000), {"type": "track", "userId": "c1"}]))
    async with served(create_app(settings)) as url:
        stderr = io.StringIO()
        status, summary = await asyncio.to_thread(
            backfill.run, str(path), url, write_key=WRITE_KEY, admin_token=None, stderr=stderr
        )
        assert status == 1  # one line rejected
        assert summary is not None and summary["complete"] is True
        assert (summary["accepted"], summary["rejected"]) == (1000, 1)
        assert "sent 0.1 / 0.1 MB (100.0%)" in stderr.getvalue()
        assert "server: 1001 lines, 1000 accepted" in stderr.getvalue()

        status, summary = await asyncio.to_thread(
            backfill.run, str(path), url, write_key="wrong", admin_token=None, stderr=io.StringIO()
        )
        assert status == 2 and summary is None
    assert len(await events_on_topic(settings, count=1000)) == 1000


async def test_bad_encodings_are_refused_before_any_answer(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    """A refusal found before anything is published is a plain 4xx (it was a 200 whose stream then
    broke off, recorded as a 200): unsupported encoding, not gzip, truncated gzip, a gzip bomb."""
    body = ndjson(orders(3))
    bomb = gzip.compress(b"\0" * 50_000_000)  # ~50 KB inflating 1,000x
    cases: list[tuple[bytes, str, int, str, str]] = [
        (body, "br", 415, "Content-Encoding", "enum"),
        (b"\x1f\x8bnot really gzip", "gzip", 400, "body", "gzip_invalid"),
        (gzip.compress(body)[:-12], "gzip", 400, "body", "gzip_invalid"),  # truncated
        (gzip.compress(body) + b"trailing junk", "gzip", 400, "body", "gzip_invalid"),
        (bomb, "gzip", 413, "body", "max_ratio"),
    ]
    for content, encoding, status, field, rule in cases:
        headers = {**ADMIN, "Content-Type": "application/x-ndjson", "Content-Encoding": encoding}
        response = await client.post("/v1/import", content=content, headers=headers)
        assert response.status_code == status, (encoding, response.text)
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["error"] and answer["message"]
        assert [(e["field"], e["rule"]) for e in answer["errors"]] == [(field, rule)]
    assert await events_on_topic(settings, idle=1.0) == []


async def test_bad_gzip_after_events_were_published_ends_with_an_incomplete_summary(
    make_settings: object,
) -> None:
    """Once events are published the answer is a 200 whose summary says where to resume."""
    settings: IngestSettings = make_settings(  # type: ignore[operator]
        IngestSettings, write_keys=[WRITE_KEY], import_chunk_events=2, import_progress_interval_s=0.0
    )
    good = gzip.compress(ndjson(orders(5)))
    async with running(create_app(settings)) as client:
        response = await client.post(
            "/v1/import",
            content=good + b"junk after the gzip member",
            headers={**ADMIN, "Content-Encoding": "gzip"},
        )
    assert response.status_code == 200
    summary = summary_of(response.content)
    # 4 lines written in chunks of 2; the 5th was read but not written when the junk was found.
    assert (summary["complete"], summary["error"], summary["accepted"], summary["resumeFromLine"]) == (
        False,
        "invalid_gzip",
        4,
        5,
    )
    assert [(e["field"], e["rule"]) for e in summary["errors"]] == [("body", "gzip_invalid")]  # type: ignore[attr-defined]
    assert len(await events_on_topic(settings, idle=1.0)) == 4


async def test_concatenated_gzip_members_are_all_imported(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    rows = orders(6)
    # `cat a.gz b.gz`: gzip reads both members (only the first was imported), zero padding allowed.
    content = gzip.compress(ndjson(rows[:3])) + gzip.compress(ndjson(rows[3:])) + b"\0" * 8
    response = await client.post("/v1/import", content=content, headers={**ADMIN, "Content-Encoding": "gzip"})
    summary = summary_of(response.content)
    assert (summary["complete"], summary["lines"], summary["accepted"]) == (True, 6, 6)
    assert len(await events_on_topic(settings, count=6)) == 6


def test_gzip_is_inflated_in_bounded_pieces() -> None:
    stream = GzipStream(max_ratio=100, allowance=1_000_000, piece=64 * 1024)
    sizes = [len(piece) for piece in stream.feed(gzip.compress(b"x" * 900_000))]
    assert max(sizes) <= 64 * 1024 and sum(sizes) == 900_000
    stream.finish()
    bomb = GzipStream(max_ratio=100, allowance=1_000_000)
    with pytest.raises(ApiError) as refused:
        for _ in bomb.feed(gzip.compress(b"\0" * 20_000_000)):
            pass
    assert refused.value.status_code == 413
    assert bomb.inflated < 2_000_000  # stopped at the limit, not after inflating everything


async def test_a_file_starting_with_a_byte_order_mark_imports_its_first_line(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    """Excel, PowerShell and .NET write a UTF-8 byte order mark at the start of a file: its first
    line was refused as invalid JSON (an event lost), gzip'ed or not; only the file's start is looked at."""
    bom = b"\xef\xbb\xbf"
    rows = orders(2)
    response = await client.post("/v1/import", content=bom + ndjson(rows), headers=ADMIN)
    summary = summary_of(response.content)
    assert (summary["accepted"], summary["rejected"]) == (2, 0), summary
    # A one-line file without a final newline, gzip'ed.
    one = {**orders(3)[2], "messageId": "bom-last"}  # type: ignore[dict-item]
    response = await client.post(
        "/v1/import",
        content=gzip.compress(bom + orjson.dumps(one)),
        headers={**ADMIN, "Content-Encoding": "gzip"},
    )
    summary = summary_of(response.content)
    assert (summary["accepted"], summary["rejected"]) == (1, 0), summary
    # A mark anywhere else is text of its line (invalid JSON there), as before.
    response = await client.post(
        "/v1/import", content=ndjson(orders(1)) + bom + ndjson(orders(1)), headers=ADMIN
    )
    errors = [(e["line"], e["rule"]) for e in summary_of(response.content)["errors"]]  # type: ignore[attr-defined]
    assert errors == [(2, "json_invalid")]
    assert len(await events_on_topic(settings, count=3)) == 3
