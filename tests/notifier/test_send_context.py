"""`store.send_context_repo.read`: a batch's send context in one statement reads the same as the
four queries it stands for (contacts by any identifier, templates, topics, consent choices)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from services.notifier.domain.composition import ContactView
from services.notifier.store import (
    consent_repo,
    contacts_repo,
    identities_repo,
    send_context_repo,
    templates_repo,
)

NOW = datetime(2026, 3, 1, tzinfo=UTC)


async def test_one_round_trip_reads_what_the_four_queries_read(start_notifier: Callable[..., Any]) -> None:
    async with start_notifier() as h:
        await h.create_template(
            {
                "id": "welcome",
                "name": "Welcome",
                "channel": "email",
                "variants": {"en": {"subject": "Hi {{ traits.name }}", "html": "<p>Hi</p>", "text": "Hi"}},
            }
        )
        await h.create_topic("news", ["email", "sms"])
        await h.create_topic("tips", ["email"], default_subscribed=False)
        async with h.platform.unit_of_work() as uow:
            s = uow.session
            await contacts_repo.upsert(
                s,
                [
                    (
                        ContactView(
                            "c1", email="ann@example.com", locale="nb", traits={"name": "Ann", "n": [1]}
                        ),
                        NOW,
                    ),
                    (ContactView("c2", phone="+4712345678"), NOW),
                ],
            )
            await identities_repo.link(s, "c1", ["u1", "anon-1"], NOW)
            await consent_repo.record_choices(
                s, "u1", [("news", "email", False), ("tips", "email", True)], source="test", now=NOW
            )
        customers = {"u1", "c2", "nobody"}
        templates = {"welcome", "missing"}
        topics = {"news", "tips", "gone"}
        async with h.platform.unit_of_work() as uow:
            s = uow.session
            read = await send_context_repo.read(s, customers, templates, topics)
            one_by_one = (
                await contacts_repo.get_many(s, customers),
                await templates_repo.get_many(s, templates),
                await consent_repo.topics_by_id(s, topics),
                await consent_repo.choices_for(s, customers),
            )
    assert (read.contacts, read.templates, read.topics, read.choices) == one_by_one
    assert read.contacts["u1"] == ContactView(
        "c1", email="ann@example.com", locale="nb", traits={"name": "Ann", "n": [1]}
    )
    assert set(read.contacts) == {"u1", "c2"} and set(read.templates) == {"welcome"}
    assert read.topics["news"].channels == ("email", "sms") and not read.topics["tips"].default_subscribed
    assert read.choices == {"u1": {("news", "email"): False, ("tips", "email"): True}, "c2": {}, "nobody": {}}
