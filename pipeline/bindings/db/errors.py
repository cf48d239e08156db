"""How a failed statement becomes one of edgepipe's errors, at the DB binding's boundary.

`classify` sorts a driver exception by SQLite's primary result code or PostgreSQL's
SQLSTATE, never by its message text (which changes with versions and locales):
TransientError for faults that pass, DataError for values the database refuses (poison:
retrying cannot help), BindingError for the rest. `translate_errors` applies it so that no
SQLAlchemy or driver exception crosses the binding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import BindingError, DataError, TransientError

SQLITE_TRANSIENT = {5, 6, 7, 8, 10, 13, 14, 15}  # BUSY LOCKED NOMEM READONLY IOERR FULL CANTOPEN PROTOCOL
SQLITE_DATA = {18, 19, 20, 25}  # TOOBIG CONSTRAINT MISMATCH RANGE
PG_TRANSIENT = ("08", "40", "53", "55P03", "57", "58")  # connection, rollback, resources, lock, shutdown, I/O
PG_DATA = ("22", "23")  # data exception, integrity constraint violation


def classify(exc: BaseException) -> type[BindingError]:
    """The edgepipe error class of a driver exception (or SQLAlchemy's wrapper of one):
    TransientError for faults that pass (a lock, a full disk, an I/O error, a dropped
    connection, a serialization failure), DataError for values the database refuses
    (constraints, overflows, text it cannot store: poison), BindingError otherwise."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return TransientError
        exc = exc.orig or exc
    if isinstance(exc, OverflowError):  # sqlite3: an int that does not fit in 64 bits
        return DataError
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        return TransientError if primary in SQLITE_TRANSIENT else DataError if primary in SQLITE_DATA else BindingError
    state = getattr(exc, "sqlstate", None)
    if state:
        if state.startswith(PG_TRANSIENT):
            return TransientError
        return DataError if state.startswith(PG_DATA) else BindingError
    if type(exc).__name__ in ("OperationalError", "InterfaceError"):  # psycopg: no SQLSTATE, the link broke
        return TransientError
    return BindingError


_WHAT = {TransientError: "database unavailable", DataError: "database refused the data"}


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map driver and SQLAlchemy exceptions into edgepipe's hierarchy at the binding
    boundary (`classify`): no SQLAlchemy exception crosses it."""
    try:
        yield
    except (SQLAlchemyError, OverflowError) as exc:
        orig = getattr(exc, "orig", None) or exc
        kind = classify(exc)
        what = _WHAT.get(kind, "database error")
        text = "; ".join(line.strip() for line in str(orig).splitlines() if line.strip())
        raise kind(f"{what}: {type(orig).__name__}: {text}") from exc
