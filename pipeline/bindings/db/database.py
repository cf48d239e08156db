"""`Database`, the DB binding: one SQLAlchemy engine for SQLite or PostgreSQL, and its
transactions.

`Database` is built in layers, each a module: `Dialect` (engine.py: the engine and the
statements that differ by dialect), `FastPath` (fastpath.py: the statement cache and the
driver-cursor execution), `Bulk` (bulk.py: insert-if-new, deletes by key, additive
upserts), `Maintenance` (maintenance.py: sizes, space reclaim, planner hints) and, here,
the transactions; backups (`dump`, `restore_dump`) are backup.py's.

`transaction()` is re-entrant per context: a handler that opens a transaction while the
worker loop already holds one joins it, so a queue batch's event rows, aggregates and the
ack of its messages commit together. On SQLite the writers of this process queue on a
lock and all write on one pinned connection, whose WAL checkpoints a background
`Checkpointer` runs (checkpointer.py).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from pipeline.bindings.db import backup
from pipeline.bindings.db.checkpointer import Checkpointer
from pipeline.bindings.db.engine import open_engine
from pipeline.bindings.db.errors import translate_errors
from pipeline.bindings.db.maintenance import Maintenance

_REDOABLE = "SET LOCAL synchronous_commit = off"


class Database(Maintenance):
    """The DB binding. Create one per process from a URL; pass it explicitly."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(open_engine(url))
        self._writer = self.engine.execution_options(edgepipe_begin="BEGIN IMMEDIATE")
        self._current: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
            f"edgepipe_tx_{id(self)}", default=None
        )
        # SQLite has one writer at a time. Writers of this process queue on a lock, woken
        # the moment the holder commits; left to SQLite's busy handler, a waiting writer
        # polls with sleeps of 1, 2, 5, 10… ms, and a consumer meeting a snapshot refresh's
        # write lost up to a fifth of its throughput that way. Other processes still meet
        # the busy handler.
        self._writers: AbstractContextManager[Any] = threading.Lock() if self.dialect == "sqlite" else nullcontext()
        # SQLite: every write transaction of this process runs on this one connection (the
        # lock above already makes them take turns). A connection that sees another one's
        # commit drops its whole page cache at its next transaction, and the pool hands out
        # connections in turn: a snapshot refresh writing on a second connection made every
        # later batch of the consumer start cold.
        self._pinned: Connection | None = None
        self._checkpointer: Checkpointer | None = None

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction; joins the caller's if one is open in this context."""
        outer = self._current.get()
        if outer is not None:
            yield outer
            return
        with self._writers, translate_errors(), self._write_connection() as conn, conn.begin():
            token = self._current.set(conn)
            try:
                yield conn
            finally:
                self._current.reset(token)
        if self._checkpointer is not None:
            self._checkpointer.committed(conn.connection.driver_connection.total_changes)  # type: ignore[union-attr]

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """The connection for a write transaction: on SQLite the pinned one (closed after a
        failure, so the next transaction starts on a fresh one), else one from the pool."""
        if self.dialect != "sqlite":
            with self._writer.connect() as conn:
                yield conn
            return
        if self._pinned is None:
            self._pinned = self._writer.connect()
            if self.engine.url.database not in (None, "", ":memory:"):  # a file: it has a WAL
                self._pinned.connection.driver_connection.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[union-attr]
                if self._checkpointer is None:
                    self._checkpointer = Checkpointer(self.engine, self._writers)
        try:
            yield self._pinned
        except BaseException:
            pinned, self._pinned = self._pinned, None
            pinned.close()
            raise

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

    def redoable(self, conn: Connection) -> None:
        """Declare the open transaction redoable: a crash may lose it whole without harm,
        because whatever it did is done again (it took queue messages inside itself, and a
        lost commit gives them back, as a rollback would). PostgreSQL then returns from its
        commit without waiting for the WAL to reach the disk (`synchronous_commit = off`
        for this transaction): the commit is as atomic as any, and the next commit that does
        wait (any other transaction's) makes it durable too; a crash before that loses at
        most the last few of these transactions (three WAL writer delays: 0.6 s by
        default). The wait is a WAL flush a commit, 0.5-1.5 ms on the development machine,
        several on a busy disk. SQLite: nothing (its commits do not wait for the disk)."""
        if self.dialect == "postgresql":
            with self.driver_errors(_REDOABLE):
                conn.connection.driver_connection.execute(_REDOABLE)  # type: ignore[union-attr]

    @property
    def checkpointer(self) -> Checkpointer | None:
        """SQLite: the background WAL checkpointer of this process's writer (started by its
        first write transaction); None before that and on other dialects."""
        return self._checkpointer

    def wait_checkpoints(self) -> None:
        """Wait for the background checkpointer, if any, to finish what it was asked."""
        if self._checkpointer is not None:
            self._checkpointer.wait_idle()

    def dump(self, on_snapshot: Callable[[], None] | None = None) -> AbstractContextManager[backup.Dump]:
        """A consistent copy of edgepipe's tables as a byte stream, for a backup (backup.py)."""
        return backup.dump(self, on_snapshot)

    def restore_dump(
        self, payload: str, chunks: Iterable[bytes], expected: dict[str, int], workdir: Path | None = None
    ) -> dict[str, int]:
        """Load a dump into this database, which holds the schema and no rows (backup.py)."""
        return backup.restore(self, payload, chunks, expected, workdir)

    def occupied_tables(self) -> list[str]:
        """edgepipe's tables that hold at least one row."""
        return backup.occupied(self)

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with self._writers:
            if self._pinned is not None:
                self._pinned.close()
                self._pinned = None
        self.engine.dispose()
