"""The DB binding: one SQLAlchemy engine for SQLite or PostgreSQL.

Every statement in edgepipe is SQLAlchemy Core and runs on both dialects; the few places
where they differ (upserts, LEAST/GREATEST, SKIP LOCKED) branch here on `dialect`, once.

`transaction()` is re-entrant per thread: a handler that opens a transaction while the
worker loop already holds one joins it, so a queue batch's event rows, aggregates and the
ack of its messages commit together.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from pipeline.errors import BindingError, TransientError

SQLITE_BUSY_TIMEOUT_MS = 30_000


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
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that later upgrades to a
        # writer can fail with SQLITE_BUSY without waiting on busy_timeout.
        conn.exec_driver_sql(conn.get_execution_options().get("edgepipe_begin", "BEGIN"))

    return engine


class Database:
    """The DB binding. Create one per process from a URL; pass it explicitly."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise BindingError(f"bad database URL {url!r}: {exc}") from None
        if parsed.get_backend_name() == "sqlite":
            self.engine = _sqlite_engine(parsed)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            self.engine = sa.create_engine(parsed, pool_pre_ping=True)
        self.dialect: str = self.engine.dialect.name
        self._writer = self.engine.execution_options(edgepipe_begin="BEGIN IMMEDIATE")
        self._current: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
            f"edgepipe_tx_{id(self)}", default=None
        )

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction; joins the caller's if one is open in this context."""
        outer = self._current.get()
        if outer is not None:
            yield outer
            return
        with translate_errors(), self._writer.begin() as conn:
            token = self._current.set(conn)
            try:
                yield conn
            finally:
                self._current.reset(token)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot (or the open write transaction, when there is one)."""
        outer = self._current.get()
        if outer is not None:
            yield outer
            return
        with translate_errors(), self.engine.connect() as conn:
            yield conn

    def in_transaction(self) -> bool:
        return self._current.get() is not None

    # -- dialect differences, in one place -------------------------------------------

    def insert(self, table: sa.Table) -> Any:
        """A dialect INSERT that supports on_conflict_do_nothing / do_update."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def least(self, a: Any, b: Any) -> Any:
        return sa.func.min(a, b) if self.dialect == "sqlite" else sa.func.least(a, b)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b) if self.dialect == "sqlite" else sa.func.greatest(a, b)

    def upsert_add(
        self,
        conn: Connection,
        table: sa.Table,
        rows: Sequence[dict[str, Any]],
        keys: Sequence[str],
        minimum: Sequence[str] = (),
        maximum: Sequence[str] = (),
    ) -> None:
        """Insert rows; on a key conflict add every non-key column to the stored value
        (`n = n + excluded.n`), except `minimum`/`maximum` columns which keep the extreme."""
        if not rows:
            return
        stmt = self.insert(table)
        ex = stmt.excluded
        sets: dict[str, Any] = {}
        for name in rows[0]:
            if name in keys:
                continue
            col = table.c[name]
            if name in minimum:
                sets[name] = self.least(col, ex[name])
            elif name in maximum:
                sets[name] = self.greatest(col, ex[name])
            else:
                sets[name] = col + ex[name]
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=sets), rows)

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map SQLAlchemy's exceptions into edgepipe's hierarchy at the binding boundary."""
    try:
        yield
    except OperationalError as exc:
        text = str(exc.orig)
        if "locked" in text or "busy" in text or "could not connect" in text:
            raise TransientError(f"database unavailable: {text}") from exc
        raise BindingError(f"database error: {text}") from exc
    except SQLAlchemyError as exc:
        if isinstance(exc, sa.exc.IntegrityError):
            raise
        raise BindingError(f"database error: {exc}") from exc
