"""What a database error says, by SQLSTATE, and the transaction-scoped lock timeout: plumbing every
service's store and background loops share (which SQLSTATEs a loop retries is its own business)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

LOCK_NOT_AVAILABLE = "55P03"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the database error behind `exc`: straight from asyncpg (the `Statement`s), or
    wrapped by SQLAlchemy (`orig`, the adapted error, whose cause is asyncpg's)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        state = getattr(e, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return None


async def set_lock_timeout(session: AsyncSession, ms: int) -> None:
    """For the rest of this transaction, a lock not granted within `ms` raises (SQLSTATE 55P03)."""
    await session.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{int(ms)}ms"})


def is_lock_timeout(exc: BaseException) -> bool:
    return sqlstate(exc) == LOCK_NOT_AVAILABLE
