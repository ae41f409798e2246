"""What every service can store: no NUL character (U+0000) anywhere, JSON at most `MAX_DEPTH` levels
deep, times within 1900-2999.

PostgreSQL's `text` refuses it ("invalid byte sequence for encoding UTF8: 0x00") and so does `jsonb`
("\\u0000 cannot be converted to text"). An event holding one would be accepted by ingest, published,
and then fail in every consumer that stores it (dead-lettered, its profile never updated); an admin
call holding one would fail in the database. So inputs are checked where they enter: ingest refuses
such an event with a 400 naming the field, the HTTP layer (`shared.http`) such a path, query or body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

NUL = "\x00"
# How JSON text spells the character (JSON forbids it raw inside strings): a byte search for this is
# the cheap test before walking a parsed document (it also matches an escaped backslash followed by
# "u0000", which the walk then finds harmless).
NUL_ESCAPE = b"\\u0000"
RULE = "no_nul_character"
MESSAGE = "must not contain the NUL character (U+0000), which PostgreSQL cannot store"


def nul_path(value: Any, path: str = "") -> str | None:
    """The dotted path (`properties.a`, `items.3`) of the first string in `value`, a key or a value at
    any depth of dicts and lists, that holds U+0000; `path` itself for such a string; else None."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            child = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and NUL in k:
                return child
            found = nul_path(v, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = nul_path(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


# JSON text may escape half a surrogate pair alone ("\ud800"): Python's JSON reader and pydantic's
# `Any` take it as a str, but it is no character, and UTF-8 has no spelling for it: orjson and asyncpg
# refuse to write it (a TypeError or UnicodeEncodeError where it is written).
SURROGATE_RULE = "unpaired_surrogate"
SURROGATE_MESSAGE = "must not contain an unpaired surrogate (\\ud800-\\udfff alone), which is not a character"


def has_unpaired_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def surrogate_path(value: Any, path: str = "") -> str | None:
    """As `nul_path`, for a string holding an unpaired surrogate."""
    if isinstance(value, str):
        return path if has_unpaired_surrogate(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            child = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and has_unpaired_surrogate(k):
                return child.encode("utf-8", "backslashreplace").decode("utf-8")
            found = surrogate_path(v, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = surrogate_path(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


# orjson, which every consumer uses to write jsonb, refuses documents deeper than 254 levels (and
# pydantic's serializer, at ingest, ~400). Real events nest a few levels; this leaves room.
MAX_DEPTH = 64
DEPTH_RULE = "max_depth"
DEPTH_MESSAGE = f"must not nest objects and lists more than {MAX_DEPTH} levels deep"


def may_be_too_deep(json_text: bytes) -> bool:
    """False when the JSON text cannot nest `MAX_DEPTH` levels (fewer opening brackets than that):
    a byte count, much cheaper than walking the parsed document."""
    return json_text.count(b"{") + json_text.count(b"[") > MAX_DEPTH


def too_deep_path(value: Any, path: str = "", depth: int = 0) -> str | None:
    """The dotted path of the first dict or list in `value` nested past `MAX_DEPTH`, or None."""
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            return path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            found = too_deep_path(v, f"{path}.{k}" if path else str(k), depth + 1)
            if found is not None:
                return found
    return None


# Times every service can compute with. Wide enough for any real history and any clock; at the
# extremes asyncpg reads 0001-01-01 and 9999-12-31 as -infinity/infinity, and date arithmetic near
# them overflows: one such event time or trait date failed every later event of its customer.
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(3000, 1, 1, tzinfo=UTC)
TIME_RULE = "range"
TIME_MESSAGE = "must be from 1900-01-01 to 2999-12-31 (UTC)"


def time_in_range(value: datetime) -> bool:
    """Whether `value` lies within `EARLIEST_TIME`..`LATEST_TIME` (a naive one is read as UTC)."""
    try:
        return EARLIEST_TIME <= (value if value.tzinfo else value.replace(tzinfo=UTC)) < LATEST_TIME
    except OverflowError:  # 9999-12-31 east of UTC, 0001-01-01 west of it
        return False
