"""Send-ledger and Idempotency-Key retention: decided messages (with their engagements) and old keys
go; a message still being decided never does."""

from __future__ import annotations

from sqlalchemy import text

from services.notifier.store import api_requests_repo, ledger_repo
from shared.db.retention import Retention
from tests.notifier.conftest import ADMIN, Harness
from tests.notifier.test_email import email_request, setup
from tests.support import eventually

DATA = {"traits": {"first_name": "Old"}, "event": {"properties": {"total": 1}}}
AGE = "UPDATE {table} SET created_at = created_at - make_interval(days => 100)"


async def count(h: Harness, sql: str) -> int:
    async with h.platform.engine.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def test_decided_messages_and_old_keys_go_undecided_ones_stay(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.publish(email_request("m-old-1", "o1", recipient={"email": "o1@example.com"}, data=DATA))
        await h.wait_status("m-old-1", "delivered")
        async with h.platform.engine.begin() as conn:
            await conn.execute(text("INSERT INTO engagements VALUES ('m-old-1', 'opened', '', now())"))
        receipt = {
            "customer_id": "o1",
            "channel": "email",
            "template_id": "welcome",
            "recipient": {"email": "o1@example.com"},
            "data": DATA,
        }
        sent = await h.client.post("/v1/messages", headers={**ADMIN, "Idempotency-Key": "r-1"}, json=receipt)
        assert sent.status_code == 202, sent.text
        await h.wait_status(sent.json()["message_id"], "delivered")
        # No address and no profile yet: retried later, so still pending.
        await h.publish(email_request("m-old-2", "nobody-yet", data=DATA))
        await eventually(lambda: h.ledger_entry("m-old-2", "pending"), timeout=15)

        async with h.platform.engine.begin() as conn:
            for table in ("send_ledger", "api_requests"):
                await conn.execute(text(AGE.format(table=table)))
        rules = [ledger_repo.ledger_rule(30), api_requests_repo.idempotency_rule(30)]
        clock = h.app.state.notifier.clock
        retention = Retention(h.platform.engine, h.settings.db_schema, clock, rules, interval_s=60)
        assert await retention.run_once() == {"send_ledger": 2, "api_requests": 1}
        assert await count(h, "SELECT count(*) FROM send_ledger") == 1
        assert await h.ledger_entry("m-old-2", "pending") is not None
        assert await count(h, "SELECT count(*) FROM engagements") == 0
        assert await count(h, "SELECT count(*) FROM api_requests") == 0
        assert await retention.run_once() == {"send_ledger": 0, "api_requests": 0}
