"""The inbox and outbox tables every service's first migration creates in its own schema, and
`outbox_parked`, where the outbox relay moves rows too large for Kafka (a later migration of each
service: `create_parked_in_migration`).

An outbox row is one message (topic, key, value, headers), or, with `messages` set, a packed row: a
unit of work's messages in emission order, `value` holding them as a JSON array of `[topic, key,
value, headers]` and the other columns NULL (`pack_outbox_in_migration`; see `shared.db.outbox`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

# A row of one message has its topic and headers; a packed row has them in its value.
_ROW_SHAPE = (
    "(messages IS NULL AND topic IS NOT NULL AND headers IS NOT NULL) "
    "OR (messages IS NOT NULL AND messages > 0 AND topic IS NULL)"
)


def _parked_columns(*, part: bool) -> list[sa.Column[Any]]:
    # The outbox row as it was (its id kept: the order it was written in), why and when it was parked.
    # `part` (`pack_outbox_in_migration`): a packed row's messages are parked one by one, under its id
    # and the message's place in it.
    parts = [sa.Column("part", sa.Integer, primary_key=True, server_default="0")] if part else []
    return [
        sa.Column("id", sa.BigInteger, primary_key=True),
        *parts,
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]


def define(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """Adds inbox, outbox and outbox_parked to `metadata`; returns inbox and outbox."""
    inbox = sa.Table(
        "inbox",
        metadata,
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    outbox = sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("topic", sa.Text, nullable=True),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("messages", sa.Integer, nullable=True),
        sa.CheckConstraint(_ROW_SHAPE, name="outbox_row_shape"),
    )
    # What `pack_outbox_in_migration` sets on the services' tables, for tables made from metadata.
    store_uncompressed = sa.DDL("ALTER TABLE %(fullname)s ALTER COLUMN value SET STORAGE EXTERNAL")  # type: ignore[no-untyped-call]
    sa.event.listen(outbox, "after_create", store_uncompressed)
    sa.Table("outbox_parked", metadata, *_parked_columns(part=True))
    return inbox, outbox


def create_in_migration() -> None:
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("inbox_processed_at", "inbox", ["processed_at"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def create_parked_in_migration() -> None:
    op.create_table("outbox_parked", *_parked_columns(part=False))


def drop_parked_in_migration() -> None:
    op.drop_table("outbox_parked")


def pack_outbox_in_migration() -> None:
    """Packed outbox rows (`shared.db.outbox`): the `messages` column, topic and headers NULL on
    packed rows (and only there), values stored uncompressed (a packed row is often MBs of JSON:
    compressing it cost more database CPU than the rows it replaced; rows live for milliseconds, so
    the disk they take is bounded, but a large single row, a profile snapshot, writes more WAL), and
    parked messages keyed by (id, part)."""
    op.add_column("outbox", sa.Column("messages", sa.Integer, nullable=True))
    op.alter_column("outbox", "topic", nullable=True)
    op.alter_column("outbox", "headers", nullable=True)
    op.create_check_constraint("outbox_row_shape", "outbox", _ROW_SHAPE)
    op.execute("ALTER TABLE outbox ALTER COLUMN value SET STORAGE EXTERNAL")
    op.add_column("outbox_parked", sa.Column("part", sa.Integer, nullable=False, server_default="0"))
    op.execute("ALTER TABLE outbox_parked DROP CONSTRAINT outbox_parked_pkey")
    op.create_primary_key("outbox_parked_pkey", "outbox_parked", ["id", "part"])


def unpack_outbox_in_migration() -> None:
    """Back to one message a row. Packed rows still waiting are unpacked, in order: every waiting row
    is renumbered, keeping the order the relay publishes them in."""
    # Nothing written or taken meanwhile: a row committed between the copy and the delete was lost.
    op.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "CREATE TEMPORARY TABLE outbox_unpacked AS "
        "SELECT o.id, 0 AS part, o.topic, o.key, o.value, o.headers, o.created_at FROM outbox o "
        "WHERE o.messages IS NULL UNION ALL "
        "SELECT o.id, m.n::int, m.v->>0, convert_to(m.v->>1, 'UTF8'), convert_to(m.v->>2, 'UTF8'), m.v->3, "
        "o.created_at FROM outbox o, jsonb_array_elements(convert_from(o.value, 'UTF8')::jsonb) "
        "WITH ORDINALITY AS m(v, n) WHERE o.messages IS NOT NULL"
    )
    op.execute("DELETE FROM outbox")
    op.execute(
        "INSERT INTO outbox (topic, key, value, headers, created_at) "
        "SELECT topic, key, value, headers, created_at FROM outbox_unpacked ORDER BY id, part"
    )
    op.execute("DROP TABLE outbox_unpacked")
    op.drop_constraint("outbox_row_shape", "outbox")
    op.drop_column("outbox", "messages")
    op.alter_column("outbox", "topic", nullable=False)
    op.alter_column("outbox", "headers", nullable=False)
    op.execute("ALTER TABLE outbox ALTER COLUMN value SET STORAGE EXTENDED")
    # Messages parked out of packed rows (and unreadable packed rows, part -1) keep their rows under
    # ids of their own (never an outbox id).
    op.execute(
        "UPDATE outbox_parked SET id = nextval(pg_get_serial_sequence('outbox', 'id')) WHERE part <> 0"
    )
    op.execute("ALTER TABLE outbox_parked DROP CONSTRAINT outbox_parked_pkey")
    op.drop_column("outbox_parked", "part")
    op.create_primary_key("outbox_parked_pkey", "outbox_parked", ["id"])


def drop_in_migration() -> None:
    op.drop_table("outbox")
    op.drop_table("inbox")
