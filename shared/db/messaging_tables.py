"""The inbox and outbox tables every service's first migration creates in its own schema, and
`outbox_parked`, where the outbox relay moves rows too large for Kafka (a later migration of each
service: `create_parked_in_migration`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB


def _parked_columns() -> list[sa.Column[Any]]:
    # The outbox row as it was (its id kept: the order it was written in), why and when it was parked.
    return [
        sa.Column("id", sa.BigInteger, primary_key=True),
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
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    sa.Table("outbox_parked", metadata, *_parked_columns())
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
    op.create_table("outbox_parked", *_parked_columns())


def drop_parked_in_migration() -> None:
    op.drop_table("outbox_parked")


def drop_in_migration() -> None:
    op.drop_table("outbox")
    op.drop_table("inbox")
