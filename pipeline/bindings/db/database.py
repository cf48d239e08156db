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

**Commits in the background (PostgreSQL).** Writes whose results nobody reads (a batch's
aggregate upserts) can be left to the end of the transaction with `at_commit`. A
transaction opened with `background=True` then returns from its block at once: its
at-commit work and its commit run on the binding's committer thread (one at a time, in
order), whose `Future` is `committing`, while the caller goes on with the next
transaction: the server writes one batch while the worker takes and decodes the next (the
two cores work at once instead of in turn). The transaction is as atomic as any; the
caller must wait for the Future before it reports the work done, and a failure there
rolls the whole transaction back. A transaction that writes rows the commit in flight may
also write waits for it first (`await_commit`): it must never hold a lock that commit
waits for. Elsewhere (SQLite, whose one writer gains nothing) `background` runs them at the
block's end, as usual, and `committing` is a Future already done.

**Transactions opened ahead (PostgreSQL).** `open_ahead` begins the next background
transaction before its block, on a connection of its own, and sends its first statement
without waiting (the queue's take of the next batch): the server runs it while this
process handles the transaction in hand. The next `transaction(background=True)` runs in
it and reads the result there (`opened_ahead`).
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.engine import Connection

from pipeline import clock
from pipeline.bindings.db import backup
from pipeline.bindings.db.checkpointer import Checkpointer
from pipeline.bindings.db.engine import open_engine
from pipeline.bindings.db.errors import translate_errors
from pipeline.bindings.db.maintenance import Maintenance

AtCommit = Callable[[Connection], None]
KEPT_CONNECTIONS = 3  # idle write connections a PostgreSQL binding keeps


class _Tail:
    """What a transaction does at its end: the at-commit work, and where."""

    __slots__ = ("ahead", "background", "work")

    def __init__(self, background: bool, ahead: Callable[[], Any] | None = None) -> None:
        self.background = background
        self.ahead = ahead  # the result of what `open_ahead` sent in this transaction before its block
        self.work: list[AtCommit] = []


class _Ahead:
    """A background transaction opened before its block (`Database.open_ahead`)."""

    __slots__ = ("conn", "result", "stack")

    def __init__(self, stack: ExitStack, conn: Connection, result: Callable[[], Any]) -> None:
        self.stack, self.conn, self.result = stack, conn, result


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
        self._kept: list[Connection] = []  # PostgreSQL: idle write connections (`_write_connection`)
        self._checkpointer: Checkpointer | None = None
        self._tail: contextvars.ContextVar[_Tail | None] = contextvars.ContextVar(
            f"edgepipe_tail_{id(self)}", default=None
        )
        self._committer: ThreadPoolExecutor | None = None
        self._ahead: _Ahead | None = None
        # The commit of the last transaction opened with `background` (its result: the
        # monotonic time it completed; its exception: why it failed, rolled back).
        self.committing: Future[float] | None = None

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def transaction(self, background: bool = False) -> Iterator[Connection]:
        """A write transaction; joins the caller's if one is open in this context. Its
        at-commit work (`at_commit`) runs at its end, then it commits; with `background`
        on PostgreSQL, both on the committer thread (see the module's docstring), and
        `committing` is their Future."""
        outer = self._current.get()
        if outer is not None:
            yield outer
            return
        if background and self.background_commits:
            yield from self._background_transaction()
            return
        with (
            self._writers,
            translate_errors(),
            self._write_connection() as conn,
            conn.begin(),
            self._open(conn, background=False) as tail,
        ):
            yield conn
            for work in tail.work:  # work may add work
                work(conn)
        if self._checkpointer is not None:
            self._checkpointer.committed(conn.connection.driver_connection.total_changes)  # type: ignore[union-attr]
        if background:
            self.committing = Future()
            self.committing.set_result(clock.monotonic())

    def _background_transaction(self) -> Iterator[Connection]:
        ahead, self._ahead = self._ahead, None
        stack, conn = (ahead.stack, ahead.conn) if ahead is not None else self._begin_write()
        try:
            with translate_errors(), self._open(conn, True, None if ahead is None else ahead.result) as tail:
                yield conn
                context = contextvars.copy_context()  # the work joins this transaction
        except BaseException:
            with translate_errors():
                stack.__exit__(*sys.exc_info())  # roll back, give the connection back
            raise
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepipe-commit")
        self.committing = self._committer.submit(context.run, _finish, stack, conn, tail)

    def open_ahead(self, send: Callable[[Connection], Callable[[], Any]]) -> None:
        """PostgreSQL: begin the next background transaction now, on a write connection of
        its own, and call `send(conn)` in it: it sends a statement without waiting for it
        (`send` of the fast path) and returns the function that waits for its result. The
        next `transaction(background=True)` of this binding runs in that transaction,
        where `opened_ahead()` is that function. A pipelined worker takes its next batch
        this way while it handles one: the server takes while Python decodes. A failure
        to send is raised where the result is asked for; one to connect opens nothing
        (the next transaction meets it). Rolled back by `cancel_ahead`, and at `dispose`;
        one at a time."""
        if self._ahead is not None:
            raise RuntimeError("open_ahead: a transaction opened ahead is waiting already")
        try:
            stack, conn = self._begin_write()
        except Exception:
            return
        try:
            with translate_errors():
                result = send(conn)
        except Exception as exc:  # raised where the result is asked for, in its own transaction
            result = partial(_raise, exc)
        self._ahead = _Ahead(stack, conn, result)

    def _begin_write(self) -> tuple[ExitStack, Connection]:
        """A write connection with its transaction begun, both held by the returned stack."""
        stack = ExitStack()
        with translate_errors():
            conn = stack.enter_context(self._write_connection())
            stack.enter_context(conn.begin())
        return stack, conn

    def opened_ahead(self) -> Callable[[], Any] | None:
        """In the transaction `open_ahead` began: the function that waits for the result of
        what it sent; else None."""
        tail = self._tail.get()
        return None if tail is None else tail.ahead

    def cancel_ahead(self) -> None:
        """Roll back the transaction opened ahead, if any, once its statement is done."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            ahead.result()
            ahead.conn.rollback()
        except Exception:
            with suppress(Exception):
                ahead.stack.__exit__(*sys.exc_info())  # closes the connection
        else:
            ahead.stack.close()

    @contextmanager
    def _open(self, conn: Connection, background: bool, ahead: Callable[[], Any] | None = None) -> Iterator[_Tail]:
        """`conn`'s transaction as the one open in this context, with its tail."""
        tail = _Tail(background, ahead)
        tokens = self._current.set(conn), self._tail.set(tail)
        try:
            yield tail
        finally:
            self._current.reset(tokens[0])
            self._tail.reset(tokens[1])

    def at_commit(self, work: AtCommit) -> None:
        """Run `work(conn)` at the end of the transaction open in this context, just
        before it commits (in order, on the committer thread for a background
        transaction): for writes whose results nobody reads. A failure rolls the
        transaction back."""
        tail = self._tail.get()
        if tail is None:
            raise RuntimeError("at_commit: no transaction is open in this context")
        tail.work.append(work)

    @property
    def background_commits(self) -> bool:
        """Whether `transaction(background=True)` commits on the committer thread here."""
        return self.dialect == "postgresql"

    def commits_in_background(self) -> bool:
        """Whether the transaction open in this context commits on the committer thread."""
        tail = self._tail.get()
        return tail is not None and tail.background

    def await_commit(self) -> None:
        """Wait until the commit in flight (`committing`), if any, is done, whatever its
        outcome (its owner reads that): before writing rows it may also write."""
        if self.committing is not None:
            wait_for([self.committing])

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """The connection for a write transaction: on SQLite the pinned one (closed after a
        failure, so the next transaction starts on a fresh one). Elsewhere one this binding
        kept from an earlier write transaction (a pipelined worker alternates between two),
        else one from the pool; kept again after a success, closed after a failure. A kept
        connection skips the pool's check-out, its liveness ping included (a round trip a
        batch): one that died idle fails its first statement, as one dying in use would,
        and the next transaction starts on a fresh one."""
        if self.dialect != "sqlite":
            try:
                conn = self._kept.pop()
            except IndexError:
                conn = self._writer.connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if len(self._kept) < KEPT_CONNECTIONS:
                self._kept.append(conn)
            else:
                conn.close()
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
        self.cancel_ahead()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with self._writers:
            if self._pinned is not None:
                self._pinned.close()
                self._pinned = None
        while self._kept:
            self._kept.pop().close()
        self.engine.dispose()


def _raise(exc: BaseException) -> NoReturn:
    raise exc


def _finish(stack: ExitStack, conn: Connection, tail: _Tail) -> float:
    """A background transaction's end, on the committer thread: its at-commit work, then
    its commit (a failure rolls it back); returns the monotonic time it committed."""
    with translate_errors(), stack:
        for work in tail.work:
            work(conn)
    return clock.monotonic()
