"""consent_repo.record_choices: one upsert per call, whatever the list holds."""

from __future__ import annotations

from services.notifier.store import consent_repo
from shared.clock import ManualClock


async def test_record_choices_keeps_the_last_of_conflicting_duplicates(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_topic("news", ["email"])
        async with h.platform.unit_of_work() as uow:
            # One INSERT ... ON CONFLICT DO UPDATE meeting the same row twice failed the transaction.
            changed = await consent_repo.record_choices(
                uow.session,
                "c-last",
                [("news", "email", False), ("*", "email", True), ("news", "email", True)],
                source="test",
                now=clock.now(),
            )
        assert changed == [("news", "email", True), ("*", "email", True)]
        async with h.platform.unit_of_work() as uow:
            stored = await consent_repo.preferences_of(uow.session, "c-last")
            history = await consent_repo.history(uow.session, ["c-last"])
        assert [(p["topic"], p["subscribed"]) for p in stored] == [("*", True), ("news", True)]
        assert [(e["topic"], e["subscribed"]) for e in history] == [("news", True), ("*", True)]
