"""Migrations that carry data forward, run against rows written under the revision before."""

from __future__ import annotations

from email.utils import parseaddr
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

import services.notifier.store as notifier_store
from services.notifier.domain.email_addresses import mailbox
from services.notifier.settings import NotifierSettings
from shared.db.engine import create_engine, ensure_schema
from shared.db.migrations import run_migrations

MIGRATIONS = Path(notifier_store.__file__).parent / "migrations"


def _downgrade(connection: Connection, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def test_contacts_written_before_get_the_e164_form_of_a_phone_with_its_country_code(
    make_settings: Any,
) -> None:
    settings = make_settings(NotifierSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, "0009_sms_address_optouts")
        phones = {
            "a": "+1 (415) 555-0100",
            "b": "+44 (0)20 7946 0000",  # the national trunk prefix in brackets: not part of E.164
            "c": "+1 415 555 0100 ext. 12",
            "d": "(415) 555-0100",  # no country code: read with the profile's next change
            "e": "+123",  # too short for any country
            "f": None,
        }
        async with engine.begin() as conn:
            for cid, phone in phones.items():
                await conn.execute(
                    text(
                        "INSERT INTO contacts (customer_id, phone, traits, profile_at) "
                        "VALUES (:c, :p, '{}', now())"
                    ),
                    {"c": cid, "p": phone},
                )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT customer_id, phone_e164 FROM contacts"))).all())
            indexes = set(
                (
                    await conn.execute(
                        text(
                            "SELECT indexname FROM pg_indexes "
                            "WHERE tablename = 'contacts' AND schemaname = :s"
                        ),
                        {"s": settings.db_schema},
                    )
                ).scalars()
            )
        assert rows == {
            "a": "+14155550100",
            "b": "+442079460000",
            "c": "+14155550100",
            "d": None,
            "e": None,
            "f": None,
        }
        assert "contacts_phone_e164" in indexes and "contacts_phone" not in indexes
    finally:
        await engine.dispose()


async def test_contacts_written_before_get_their_emails_mailbox(make_settings: Any) -> None:
    settings = make_settings(NotifierSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, "0012_outbox_packed")
        emails = {
            "a": "Ann@Example.com",
            "b": "Bob Example <BOB@example.com>",
            "c": " <cy@example.com> ",
            "d": "not an address",
            "e": "x" * 4000 + "@example.com",  # longer than an address: no mailbox, no index entry
            "f": None,
        }
        async with engine.begin() as conn:
            for cid, email in emails.items():
                await conn.execute(
                    text(
                        "INSERT INTO contacts (customer_id, email, traits, profile_at) "
                        "VALUES (:c, :e, '{}', now())"
                    ),
                    {"c": cid, "e": email},
                )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT customer_id, email_address FROM contacts"))).all())
        assert rows == {
            "a": "ann@example.com",
            "b": "bob@example.com",
            "c": "cy@example.com",
            "d": None,
            "e": None,
            "f": None,
        }
    finally:
        await engine.dispose()


async def test_contacts_written_before_with_a_labels_get_the_u_label_mailbox(make_settings: Any) -> None:
    """A complaint about `ann@xn--bcher-kva.example` is keyed as `ann@bücher.example` now: contacts
    whose mailbox kept the A-labels as written get the U-label form, so the complaint finds them."""
    settings = make_settings(NotifierSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, "0013_email_complaints")
        emails = {
            "a": "Ann <Ann@XN--BCHER-KVA.example>",
            "b": "bob@xn--bcher-kva.bücher.example",  # mixed writings
            "c": "cy@xn--zz.example",  # not a valid A-label: as it was
            "d": "dee@bücher.example",  # U-labels already
            "e": "eve@example.com",
            "f": "fay@xn--11b2ezcw70k.example",  # its U-label holds a zero-width joiner: as it was
        }
        async with engine.begin() as conn:
            for cid, email in emails.items():
                await conn.execute(
                    text(
                        "INSERT INTO contacts (customer_id, email, email_address, traits, profile_at) "
                        "VALUES (:c, :e, :m, '{}', now())"
                    ),
                    {"c": cid, "e": email, "m": parseaddr(email)[1].lower()},
                )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT customer_id, email_address FROM contacts"))).all())
        assert rows == {
            "a": "ann@bücher.example",
            "b": "bob@bücher.bücher.example",
            "c": "cy@xn--zz.example",
            "d": "dee@bücher.example",
            "e": "eve@example.com",
            "f": "fay@xn--11b2ezcw70k.example",
        }
        # As the notifier keys them now.
        assert all(rows[cid] == mailbox(email) for cid, email in emails.items())
        # And back: the form the code before read.
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0013_email_complaints")
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT customer_id, email_address FROM contacts"))).all())
        assert rows == {cid: parseaddr(email)[1].lower() for cid, email in emails.items()}
    finally:
        await engine.dispose()
