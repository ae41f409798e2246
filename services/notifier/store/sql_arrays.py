"""`column = ANY(:array)` instead of `IN (...)`: one statement text (and one prepared statement) for
any number of ids, where an expanding IN renders, compiles and prepares anew per list length."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY


def any_of(column: sa.ColumnElement[str], values: Iterable[str]) -> sa.ColumnElement[bool]:
    return column == sa.any_(sa.bindparam(None, list(values), type_=ARRAY(sa.Text)))
