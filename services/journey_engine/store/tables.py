"""The journey_engine schema's tables."""

from __future__ import annotations

import sqlalchemy as sa

from shared.db import messaging_tables

metadata = sa.MetaData()
inbox, outbox = messaging_tables.define(metadata)
