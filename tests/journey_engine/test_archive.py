"""Archiving: the status change holds the entry gate only a moment; the customers inside exit after it,
a chunk per transaction; a step that comes first exits its instance rather than send; a sweeper finishes
what a crash between the two left."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from services.journey_engine.store import instances as instance_store
from shared.db.locks import try_exclusive
from tests.journey_engine.harness import ADMIN, Harness, engine_running
from tests.journey_engine.test_entry import gate_waiters
from tests.journey_engine.test_timing_and_rules import linear

DRIP = [{"id": "wait", "type": "delay", "duration": "P30D"}]


async def add_waiting(h: Harness, journey_id: str, n: int) -> None:
    """n customers waiting at the journey's delay (written directly: n events would be slow)."""
    async with h.platform.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO instances (id, journey_id, version, customer_id, correlation, status, node_id, "
                "wait, context, seq, entered_at, updated_at) SELECT :j || '-' || g, :j, 1, 'c' || g, '', "
                "'active', 'wait', '{\"kind\": \"timer\"}', '{}', 1, :now, :now FROM generate_series(1, :n) g"
            ),
            {"j": journey_id, "now": h.clock.now(), "n": n},
        )


async def exited_at(h: Harness, journey_id: str, node_id: str) -> int:
    stats = (await h.client.get(f"/v1/journeys/{journey_id}/stats", headers=ADMIN)).json()
    [version] = stats["versions"]
    return int(next(n["exited"] for n in version["nodes"] if n["node_id"] == node_id))


async def test_an_archive_exits_its_customers_after_its_status_change_holding_up_no_entry(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive exited everyone inside while holding the entry gate: every entry into any journey
    waited as long as that took (1.5 s at 150,000 customers, tens of seconds at millions). Now the
    status change commits first; the exits follow in chunks, entries going on meanwhile."""
    async with engine_running(make_settings, archive_chunk_size=100) as h:
        big = await h.journey(linear("Big", "Big Event", DRIP))
        other = await h.journey(linear("Other", "Signed Up", DRIP))
        await add_waiting(h, big, 1050)
        original = instance_store.exit_unheld
        chunks: list[int] = []

        async def exit_unheld(*args: Any, **kwargs: Any) -> Any:
            if not chunks:
                # Archived already, nobody exited yet: an entry into another journey goes through.
                assert await h.scalar("SELECT status FROM journeys WHERE id = :j", j=big) == "archived"
                await h.track("someone", "Signed Up")
                assert await gate_waiters(h) == 0
            out = await original(*args, **kwargs)
            chunks.append(out[0])
            return out

        monkeypatch.setattr(instance_store, "exit_unheld", exit_unheld)
        r = await h.client.post(f"/v1/journeys/{big}/archive", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "archived", r.text
        assert [(i.customer_id, i.status) for i in await h.instances(other)] == [("someone", "active")]
        assert chunks == [100] * 10 + [50, 0]
        rows = await h.rows(
            "SELECT status, exit_reason, count(*) FROM instances WHERE journey_id = :j GROUP BY 1, 2", j=big
        )
        assert [tuple(r) for r in rows] == [("exited", "archived", 1050)]
        assert await exited_at(h, big, "wait") == 1050


def mail_then_wait_for_click() -> dict[str, Any]:
    return {
        "name": "Click check",
        "entry": {"type": "event", "event": "Joined"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "mail", "type": "send", "channel": "email", "template_id": "hello"},
            {
                "id": "clicked",
                "type": "wait_message",
                "send_node": "mail",
                "statuses": ["clicked"],
                "timeout": "P1D",
            },
            {"id": "thanks", "type": "send", "channel": "email", "template_id": "thanks"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "mail"},
            {"from": "mail", "to": "clicked"},
            {"from": "clicked", "to": "thanks", "branch": "matched"},
            {"from": "clicked", "to": "done", "branch": "timeout"},
            {"from": "thanks", "to": "done"},
        ],
    }


@pytest.mark.parametrize("caps", [False, True], ids=["timers", "timers-with-caps"])
async def test_steps_of_an_archived_journeys_customers_not_exited_yet_exit_them_and_the_sweeper_finishes(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, caps: bool
) -> None:
    """Archived, its customers not exited yet (the archive crashed between its status change and the
    exits): a due timer, an awaited event or an awaited message status exits the instance instead of
    stepping on (nothing more is sent), a goal counts no conversion, and the sweeper exits the rest."""
    settings = {"frequency_caps": {"sms": {"limit": 5, "period": "day"}}} if caps else {}
    async with engine_running(make_settings, **settings) as h:
        timers = await h.journey(
            linear(
                "Drip",
                "Signed Up",
                [
                    {"id": "hello", "type": "send", "channel": "email", "template_id": "hello"},
                    {"id": "wait", "type": "delay", "duration": "PT1H"},
                    {"id": "drip", "type": "send", "channel": "email", "template_id": "drip"},
                ],
            )
        )
        events = await h.journey(
            {
                "name": "Nudge",
                "entry": {"type": "event", "event": "Viewed"},
                "nodes": [
                    {"id": "start", "type": "entry"},
                    {"id": "seen", "type": "wait_event", "event": "Clicked", "timeout": "P3D"},
                    {"id": "thanks", "type": "send", "channel": "email", "template_id": "thanks"},
                    {"id": "done", "type": "exit"},
                ],
                "edges": [
                    {"from": "start", "to": "seen"},
                    {"from": "seen", "to": "thanks", "branch": "matched"},
                    {"from": "seen", "to": "done", "branch": "timeout"},
                    {"from": "thanks", "to": "done"},
                ],
            }
        )
        statuses = await h.journey(mail_then_wait_for_click())
        goals = await h.journey(
            linear(
                "Once",
                "Tried",
                [{"id": "try", "type": "send", "channel": "email", "template_id": "try"}],
                goal={"event": "Bought"},
            )
        )
        for customer, event in (("a", "Signed Up"), ("d", "Signed Up"), ("b", "Viewed"), ("c", "Joined")):
            await h.track(customer, event)
        await h.track("g", "Tried")
        sent = {
            (m["customer_id"], m["template_id"]): m for m in await h.requests(until=lambda m: len(m) >= 5)
        }
        assert sorted(sent) == [("a", "hello"), ("c", "hello"), ("d", "hello"), ("g", "try")]

        crashed = True
        finish = h.engine.finish_archive

        async def crash_or_finish(journey_id: str) -> int:
            if crashed:
                raise RuntimeError("the process died after the status change")
            return await finish(journey_id)

        monkeypatch.setattr(h.engine, "finish_archive", crash_or_finish)
        for jid in (timers, events, statuses, goals):
            r = await h.client.post(f"/v1/journeys/{jid}/archive", headers=ADMIN)
            assert r.status_code == 200 and r.json()["status"] == "archived", r.text
        inside = await h.rows("SELECT customer_id FROM instances WHERE status = 'active' ORDER BY 1")
        assert [r[0] for r in inside] == ["a", "b", "c", "d"]

        # Each step that comes exits its instance, sending nothing.
        async with h.platform.engine.begin() as conn:  # only a's timer is due: d's stays ahead
            await conn.execute(
                text(
                    "UPDATE timers SET due_at = :far FROM instances AS i "
                    "WHERE i.id = timers.instance_id AND i.customer_id = 'd'"
                ),
                {"far": h.clock.now() + timedelta(days=1)},
            )
        await h.advance(timedelta(hours=1))
        await h.track("b", "Clicked")
        await h.message_status("c", sent[("c", "hello")]["message_id"], "clicked")
        await h.track("g", "Bought")
        states = await h.rows("SELECT customer_id, status, exit_reason FROM instances ORDER BY 1")
        assert [tuple(r) for r in states] == [
            ("a", "exited", "archived"),
            ("b", "exited", "archived"),
            ("c", "exited", "archived"),
            ("d", "active", None),
            ("g", "exited", "completed"),
        ]
        assert await h.scalar("SELECT count(*) FROM instances WHERE converted_at IS NOT NULL") == 0
        assert await exited_at(h, timers, "wait") == 1
        assert await exited_at(h, statuses, "clicked") == 1

        # The sweeper: one replica at a time; it exits d and closes the goal windows left.
        crashed = False
        async with try_exclusive(h.platform.engine, "journey_engine.finish_archives") as mine:
            assert mine and await h.engine.finish_archives() == 0
        assert await h.engine.finish_archives() == 1
        assert [(r.customer_id, r.status, r.exit_reason) for r in await h.instances(timers)] == [
            ("a", "exited", "archived"),
            ("d", "exited", "archived"),
        ]
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 0
        assert await h.engine.finish_archives() == 0
        await h.advance(timedelta(days=2))
        assert sorted((m["customer_id"], m["template_id"]) for m in await h.requests(idle=0.5)) == sorted(
            sent
        )
