"""Database plumbing: engine per service schema, Alembic on start, inbox, outbox, unit of work."""

from shared.db.engine import create_engine, ensure_schema, session_factory
from shared.db.outbox import OutboxRelay
from shared.db.unit_of_work import UnitOfWork

__all__ = ["OutboxRelay", "UnitOfWork", "create_engine", "ensure_schema", "session_factory"]
