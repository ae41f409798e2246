"""The ingest schema's tables."""

from __future__ import annotations

import sqlalchemy as sa

from shared.db import messaging_tables

metadata = sa.MetaData()
inbox, outbox = messaging_tables.define(metadata)

# Write keys, by SHA-256 digest only: the key itself is shown once, when created.
write_keys = sa.Table(
    "write_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("key_hash", sa.Text, nullable=False, unique=True),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

# messageIds published within the dedupe window (pruned past it).
dedupe = sa.Table(
    "dedupe",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
