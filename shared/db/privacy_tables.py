"""Tables every service keeps for privacy and trust: the admin audit log and erasure tombstones.

`define` declares them on a service's metadata; each service's `0003_privacy` migration calls
`create_in_migration` (with or without tombstones: ingest holds nothing to tombstone).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

TS = sa.DateTime(timezone=True)


def _audit_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("at", TS, nullable=False),
        # The admin token's identity (a short hash prefix) and, if sent, the human's name.
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("actor_name", sa.Text, nullable=True),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("detail", JSONB, nullable=False, server_default="{}"),
    ]


def _tombstone_columns() -> list[sa.Column[object]]:
    return [
        # A salted hash of one identifier of an erased customer (never the identifier itself).
        sa.Column("identity_hash", sa.Text, primary_key=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("erased_at", TS, nullable=False),
    ]


def define_audit_log(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("audit_log", metadata, *_audit_columns())


def define_tombstones(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("erasure_tombstones", metadata, *_tombstone_columns())


def create_in_migration(*, tombstones: bool) -> None:
    op.create_table("audit_log", *_audit_columns())
    op.create_index("audit_log_at", "audit_log", ["at"])
    if tombstones:
        op.create_table("erasure_tombstones", *_tombstone_columns())


def drop_in_migration(*, tombstones: bool) -> None:
    if tombstones:
        op.drop_table("erasure_tombstones")
    op.drop_table("audit_log")
