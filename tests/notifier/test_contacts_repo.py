"""The contacts projection of clm.profiles.v1: the newest profile wins, whatever order changes arrive in."""

from __future__ import annotations

from datetime import timedelta

from services.notifier.domain.composition import ContactView
from services.notifier.store import contacts_repo
from shared.clock import ManualClock


async def test_upsert_keeps_the_newest_profile_of_each_customer(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    t0 = clock.now()
    async with start_notifier(clock=clock) as h:
        async with h.platform.unit_of_work() as uow:
            await contacts_repo.upsert(
                uow.session,
                [
                    (ContactView("ada", email="new@x.example", traits={"name": "Ada", "n": 2}), t0),
                    # Same batch, older: ignored, whatever its place in the batch.
                    (ContactView("ada", email="old@x.example", traits={"name": "Old"}), t0 - timedelta(1)),
                    (ContactView("bob", phone="+4790000000", locale="nb", timezone="Europe/Oslo"), t0),
                ],
            )
        async with h.platform.unit_of_work() as uow:
            # A later batch with an older change (a late event) changes nothing; a newer one replaces.
            await contacts_repo.upsert(
                uow.session,
                [
                    (ContactView("ada", email="late@x.example"), t0 - timedelta(seconds=1)),
                    (ContactView("bob", phone="+4791111111", traits={"vip": True}), t0 + timedelta(1)),
                ],
            )
        async with h.platform.unit_of_work() as uow:
            ada = await contacts_repo.get(uow.session, "ada")
            bob = await contacts_repo.get(uow.session, "bob")
            many = await contacts_repo.get_many(uow.session, {"ada", "bob", "nobody"})
    assert ada == ContactView("ada", email="new@x.example", traits={"name": "Ada", "n": 2})
    # The newer profile replaces the whole projection (fields it lacks are cleared).
    assert bob == ContactView("bob", phone="+4791111111", traits={"vip": True})
    assert many == {"ada": ada, "bob": bob}
