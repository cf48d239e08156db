"""The engine behind `Database`, and the SQL that differs between its two dialects.

`open_engine` turns a database URL into a SQLAlchemy engine: SQLite with its pragmas (WAL,
busy timeout, foreign keys) and transactions begun by edgepipe itself, so that a writer
takes the database lock up front (`BEGIN IMMEDIATE`); PostgreSQL through psycopg 3.

`Dialect` is the base of `Database`: the engine, its dialect's name, and the few
statements that are spelled differently on SQLite and PostgreSQL (upserts, LEAST and
GREATEST), branched on here once so that every other statement stays plain Core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from pipeline.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 30_000


def open_engine(url: str) -> Engine:
    """The engine for a database URL (`postgresql://` means psycopg 3); ConfigError for a
    URL SQLAlchemy cannot use."""
    try:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"config error: bindings.db: bad database URL {url!r}: {reason}") from None


def _sqlite_engine(url: sa.URL) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            "foreign_keys=ON",
            # This SQLite may be built to zero deleted content (Debian's is): FAST still
            # zeroes it inside pages it writes anyway, but does not write freed pages (the
            # queue frees ~70 per 1000 messages consumed: 13% of a batch's WAL frames).
            "secure_delete=FAST",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that later upgrades to a
        # writer can fail with SQLITE_BUSY without waiting on busy_timeout.
        begin = conn.get_execution_options().get("edgepipe_begin", "BEGIN")
        conn.connection.driver_connection.execute(begin)  # type: ignore[union-attr]

    return engine


class Dialect:
    """The engine, its dialect's name (`sqlite` or `postgresql`) and the statements that
    differ between the two."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name

    def insert(self, table: sa.Table) -> Any:
        """A dialect INSERT that supports on_conflict_do_nothing / do_update."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)

    def least(self, a: Any, b: Any) -> Any:
        return sa.func.min(a, b) if self.dialect == "sqlite" else sa.func.least(a, b)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b) if self.dialect == "sqlite" else sa.func.greatest(a, b)
