"""The DB binding: one SQLAlchemy engine for SQLite or PostgreSQL.

Every statement in edgepipe is SQLAlchemy Core and runs on both dialects; the few places
where they differ (upserts, LEAST/GREATEST, SKIP LOCKED) branch here on `dialect`, once.

`transaction()` is re-entrant per thread: a handler that opens a transaction while the
worker loop already holds one joins it, so a queue batch's event rows, aggregates and the
ack of its messages commit together.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import BindingError, ConfigError, DataError, TransientError

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The background checkpointer (see `Checkpointer`) is woken after this many commits or rows
# changed by this process's writer, whichever comes first: about 1000 WAL pages of
# consumer batches, SQLite's own auto-checkpoint interval.
CHECKPOINT_COMMITS = 100
CHECKPOINT_CHANGES = 10_000
WAL_LIMIT_PAGES = 16_384  # 64 MiB of 4 KiB pages: past this, the WAL is emptied (see below)
CATCH_UP_RUNS, CATCH_UP_PAGES = 4, 200


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


class Checkpointer:
    """SQLite: copies the WAL back into the database file in a background thread, so the
    writer's commits never do it.

    A checkpoint ends with two fsyncs (the WAL, then the database file) whose cost follows
    the data written since the last one: done by SQLite's auto-checkpoint inside a commit
    every 1000 pages, it took a quarter of a batch of 100 duplicates' time. Here the pinned
    writer connection has auto-checkpoints off (`wal_autocheckpoint=0`) and, every
    `CHECKPOINT_COMMITS` commits or `CHECKPOINT_CHANGES` changed rows, wakes this thread,
    which runs a PASSIVE checkpoint on its own connection (it waits for no reader or
    writer; the driver releases the GIL meanwhile). A PASSIVE checkpoint cannot catch up
    with a writer that keeps committing, and SQLite only starts the WAL file over once
    everything in it was copied: when the WAL holds `WAL_LIMIT_PAGES` or more, the
    checkpoint is repeated (without the lock while each run still finds more than
    `CATCH_UP_PAGES` new pages, at most `CATCH_UP_RUNS` times; then holding this process's
    writer lock, when it copies the few pages committed since), and the next commit starts
    the WAL over. The writer waited 0.2-0.3 s for those locked runs over a million-event
    pass (2-4% of it): each took 5-50 ms however few pages were left, being two fdatasyncs
    (the WAL's, the database file's) of ~5 ms on average on this disk and up to 50. Writers in
    other processes keep their own auto-checkpoints. A failed checkpoint is logged and
    tried again at the next wake-up."""

    def __init__(self, engine: Engine, writers: Any) -> None:
        self._engine, self._writers = engine, writers
        self._cond = threading.Condition()
        self._pending = self._running = self._stopping = False
        self._commits = self._changes_at = 0
        self.runs = self.locked_runs = 0
        self._thread = threading.Thread(target=self._run, name="edgepipe-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, total_changes: int) -> None:
        """Called by the writer after each commit, with its connection's total_changes."""
        self._commits += 1
        if self._commits >= CHECKPOINT_COMMITS or total_changes - self._changes_at >= CHECKPOINT_CHANGES:
            self._commits, self._changes_at = 0, total_changes
            with self._cond:
                self._pending = True
                self._cond.notify_all()

    def wait_idle(self) -> None:
        """Return once no checkpoint is asked for or running (benchmarks and tests)."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._pending or self._running))

    def _run(self) -> None:
        from pipeline import log

        conn: Any = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    break
                self._pending, self._running = False, True
            try:
                conn = conn or self._engine.raw_connection()
                checkpoint = conn.cursor().execute
                _busy, pages, copied = checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.runs += 1
                if pages >= WAL_LIMIT_PAGES:
                    # Catch up without the lock first: the writer waits only for what it
                    # commits during the last of these runs, and the runs get shorter.
                    for _ in range(CATCH_UP_RUNS):
                        before = copied
                        _busy, pages, copied = checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if copied - before < CATCH_UP_PAGES:
                            break
                    with self._writers:
                        checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.locked_runs += 1
            except Exception as exc:
                log.event("wal_checkpoint_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.invalidate()  # a fresh connection next time
                conn = None
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()


class Database:
    """The DB binding. Create one per process from a URL; pass it explicitly."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.make_url(url)
            if parsed.get_backend_name() == "sqlite":
                self.engine = _sqlite_engine(parsed)
            else:
                if parsed.drivername == "postgresql":
                    parsed = parsed.set(drivername="postgresql+psycopg")
                self.engine = sa.create_engine(parsed, pool_pre_ping=True)
        except (sa.exc.ArgumentError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"config error: bindings.db: bad database URL {url!r}: {reason}") from None
        self.dialect: str = self.engine.dialect.name
        self._writer = self.engine.execution_options(edgepipe_begin="BEGIN IMMEDIATE")
        self._current: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
            f"edgepipe_tx_{id(self)}", default=None
        )
        self._stmt_cache: dict[tuple[Any, ...], Any] = {}
        self._streams = 0  # names server-side cursors apart
        # SQLite has one writer at a time. Writers of this process queue on a lock, woken
        # the moment the holder commits; left to SQLite's busy handler, a waiting writer
        # polls with sleeps of 1, 2, 5, 10… ms, and a consumer meeting a snapshot refresh's
        # write lost up to a fifth of its throughput that way. Other processes still meet
        # the busy handler.
        self._writers: Any = threading.Lock() if self.dialect == "sqlite" else nullcontext()
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

    # -- the hot path ------------------------------------------------------------------
    # Statements are built once per shape and cached: building SQLAlchemy expressions per
    # batch costs more than the rows they write.

    def cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """A statement (or anything) built once per key for this database."""
        hit = self._stmt_cache.get(key)
        if hit is None:
            hit = self._stmt_cache[key] = build()
        return hit

    def _compiled(self, stmt: Any, columns: Sequence[str]) -> tuple[str, Any]:
        """(SQL text, parameter shape) of a cached statement whose bind parameters are
        `columns` (plus any constants bound in the statement itself). The shape is None
        when the driver takes the values in `columns` order as they are (see `_shaped`)."""
        key = ("sql", id(stmt), tuple(columns))
        hit = self._stmt_cache.get(key)
        if hit is None:
            compiled = stmt.compile(dialect=self.engine.dialect, column_keys=list(columns))
            consts = {n: v for n, v in compiled.params.items() if n not in columns}
            if not compiled.positional:
                shape: Any = (list(columns), consts)
            elif list(compiled.positiontup) == list(columns):
                shape = None
            else:
                shape = [(columns.index(n), None) if n in columns else (-1, consts[n]) for n in compiled.positiontup]
            hit = self._stmt_cache[key] = (str(compiled), shape)
        return hit

    @staticmethod
    def _shaped(shape: Any, row: Sequence[Any]) -> Any:
        if shape is None:
            return row
        if isinstance(shape, list):  # positional: reorder, fill in constants
            return tuple(row[i] if i >= 0 else const for i, const in shape)
        names, consts = shape
        return dict(zip(names, row, strict=True)) | consts

    def _run(self, conn: Connection, stmt: Any, columns: Sequence[str], values: Any, many: bool, fetch: bool) -> Any:
        sql, shape = self._compiled(stmt, columns)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if many:
                cursor.executemany(sql, list(values) if shape is None else [self._shaped(shape, r) for r in values])
            else:
                cursor.execute(sql, self._shaped(shape, values))
            return cursor.fetchall() if fetch else cursor.rowcount
        except self.engine.dialect.loaded_dbapi.Error as exc:  # as if SQLAlchemy had run it
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error) from exc
        finally:
            cursor.close()

    # The three below run a cached statement on the driver's cursor, skipping SQLAlchemy's
    # per-statement work (tens of µs, more than a small batch's rows cost). Bind parameters
    # are `columns`, given as tuples in that order; rows come back as the driver's plain
    # tuples, without result processing: for hot paths whose column types need none.

    def executemany(self, conn: Connection, stmt: Any, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Run an INSERT-shaped statement over rows; returns the driver's row count."""
        return self._run(conn, stmt, columns, rows, many=True, fetch=False)

    def execute(self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = ()) -> int:
        """Run a statement once; returns the driver's row count."""
        return self._run(conn, stmt, columns, values, many=False, fetch=False)

    def fetchall(
        self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = ()
    ) -> list[Any]:
        """Run a SELECT (or … RETURNING) once; returns its rows."""
        return self._run(conn, stmt, columns, values, many=False, fetch=True)

    def stream(
        self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = (), size: int = 5000
    ) -> Iterator[Any]:
        """Run a SELECT and yield its rows one by one (see `stream_chunks`)."""
        for rows in self.stream_chunks(conn, stmt, columns, values, size):
            yield from rows

    def stream_chunks(
        self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = (), size: int = 5000
    ) -> Iterator[list[Any]]:
        """Run a SELECT and yield its rows as they are fetched, lists of at most `size` (on
        PostgreSQL through a server-side cursor): memory holds one fetch whatever the
        result's size. Several streams may be open on one connection at once, in its
        transaction (begun here if none is: PostgreSQL's cursors live in one)."""
        sql, shape = self._compiled(stmt, columns)
        if not conn.in_transaction():
            conn.begin()
        driver = conn.connection.driver_connection
        self._streams += 1
        cursor = (
            driver.cursor()  # type: ignore[union-attr]
            if self.dialect == "sqlite"
            else driver.cursor(name=f"edgepipe_stream_{self._streams}")  # type: ignore[union-attr]
        )
        try:
            cursor.execute(sql, self._shaped(shape, values))
            while rows := cursor.fetchmany(size):
                yield rows
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error) from exc
        finally:
            cursor.close()

    def insert_new(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        key: Sequence[str],
        likely_present: bool = False,
    ) -> list[int]:
        """Insert rows, skipping those whose `key` (a unique index) already exists. Returns
        the positions in `rows` of the rows this call inserted. The keys within `rows`
        must be distinct.

        `likely_present` (the caller has just seen a batch that was all duplicates, as when
        a backlog is delivered again) makes SQLite first count the keys already stored, in
        one statement over a JSON array of them: when all are, nothing is inserted and the
        insert is skipped; otherwise the insert runs as usual. Counting 100 keys costs about
        two thirds of a conflicting insert of the same rows.

        On PostgreSQL this is one `INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING` the
        new keys (see `_insert_json`). On SQLite it is a plain executemany, whose row count says
        whether all or none of the rows were new (the common cases); only a mix asks which:
        the write transaction holds the database lock (BEGIN IMMEDIATE), and the new rows of
        a table keyed by an integer rowid got consecutive rowids (each the maximum plus one;
        a skipped row takes none), the last of them `last_insert_rowid()`."""
        if not rows:
            return []
        (rowid,) = table.primary_key.columns
        shape = ("insert_new", table.name, tuple(key))
        at = [columns.index(k) for k in key]
        if self.dialect == "sqlite":
            if likely_present and self._count_present(conn, table, key, list(map(itemgetter(*at), rows))) == len(rows):
                return []
            stmt = self.cached(shape, lambda: self.insert(table).on_conflict_do_nothing(index_elements=list(key)))
            count = self.executemany(conn, stmt, columns, rows)
            if count in (0, len(rows)):
                return list(range(count))
            last = self.cached(("last_insert_rowid",), lambda: sa.select(sa.func.last_insert_rowid()))
            since = self.cached(
                (*shape, "since"), lambda: sa.select(*(table.c[k] for k in key)).where(rowid > sa.bindparam("after"))
            )
            first = self.fetchall(conn, last)[0][0] - count
            new = set(self.fetchall(conn, since, ("after",), (first,)))
        else:
            stmt = self.cached(
                (*shape, tuple(columns)),
                lambda: (
                    self._insert_json(table, columns)
                    .on_conflict_do_nothing(index_elements=list(key))
                    .returning(*(table.c[k] for k in key))
                ),
            )
            new = {tuple(r) for r in conn.execute(stmt, _json_rows(rows))}
        return [i for i, r in enumerate(rows) if tuple(r[j] for j in at) in new]

    def _count_present(self, conn: Connection, table: sa.Table, key: Sequence[str], keys: list[Any]) -> int:
        """SQLite: how many of `keys` (a value per row for a one-column `key`, else a tuple of
        the `key` columns' values) `table` holds."""

        def build() -> Any:
            j = sa.func.json_each(sa.bindparam("keys")).table_valued("value").alias("j")
            item = j.c.value.op("->>")
            if len(key) == 1:
                match = [table.c[key[0]] == j.c.value]
            else:
                match = [table.c[k] == item(sa.literal_column(str(i))) for i, k in enumerate(key)]
            return sa.select(sa.func.count()).select_from(j.join(table, sa.and_(*match)))

        stmt = self.cached(("count_present", table.name, tuple(key)), build)
        return self.fetchall(conn, stmt, ("keys",), (orjson.dumps(keys).decode(),))[0][0]

    def delete_keys(self, conn: Connection, table: sa.Table, column: str, values: Sequence[Any]) -> None:
        """DELETE the rows whose `column` is one of `values` (executemany on SQLite, one
        `= ANY(array)` statement on PostgreSQL)."""
        col = table.c[column]
        if self.dialect == "sqlite":
            stmt = self.cached(
                ("delete_keys", table.name, column), lambda: table.delete().where(col == sa.bindparam("k"))
            )
            self.executemany(conn, stmt, ("k",), [(v,) for v in values])
        else:
            stmt = self.cached(
                ("delete_keys", table.name, column),
                lambda: table.delete().where(col == sa.any_(sa.bindparam("k", type_=ARRAY(col.type)))),
            )
            conn.execute(stmt, {"k": list(values)})

    def _additive(self, stmt: Any, table: sa.Table, columns: Sequence[str], keys: Sequence[str],
                  minimum: Sequence[str], maximum: Sequence[str]) -> Any:  # fmt: skip
        """ON CONFLICT DO UPDATE that adds every non-key column (`n = n + excluded.n`), except
        `minimum`/`maximum` columns, which keep the extreme."""
        ex = stmt.excluded
        sets: dict[str, Any] = {}
        for name in columns:
            if name in keys:
                continue
            col = table.c[name]
            if name in minimum:
                sets[name] = self.least(col, ex[name])
            elif name in maximum:
                sets[name] = self.greatest(col, ex[name])
            else:
                sets[name] = col + ex[name]
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=sets)

    def upsert_add(
        self,
        conn: Connection,
        table: sa.Table,
        rows: Sequence[dict[str, Any]],
        keys: Sequence[str],
        minimum: Sequence[str] = (),
        maximum: Sequence[str] = (),
    ) -> None:
        """Insert rows (dicts with the same keys); on a key conflict add them to the stored
        row (see `_additive`)."""
        if rows:
            columns = tuple(rows[0])
            values = [tuple(r[c] for c in columns) for r in rows]
            self.upsert_add_rows(conn, table, columns, values, keys, minimum, maximum)

    def upsert_add_rows(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        keys: Sequence[str],
        minimum: Sequence[str] = (),
        maximum: Sequence[str] = (),
    ) -> None:
        """`upsert_add` for row tuples in `columns` order; a key may appear only once."""
        if not rows:
            return
        columns = tuple(columns)
        if self.dialect == "sqlite":
            stmt = self.cached(
                ("upsert_add", table.name, columns, tuple(keys), tuple(minimum), tuple(maximum)),
                lambda: self._additive(self.insert(table), table, columns, keys, minimum, maximum),
            )
            self.executemany(conn, stmt, columns, rows)
            return
        stmt = self.cached(
            ("upsert_add_json", table.name, columns, tuple(keys), tuple(minimum), tuple(maximum)),
            lambda: self._additive(self._insert_json(table, columns), table, columns, keys, minimum, maximum),
        )
        conn.execute(stmt, _json_rows(rows))

    def _insert_json(self, table: sa.Table, columns: Sequence[str]) -> Any:
        """PostgreSQL: INSERT … SELECT from one JSONB array of rows (bound as `rows`, see
        `_json_rows`), each row an array of values in `columns` order, cast to the columns'
        types by the server. Many rows, one statement and one parameter: an executemany
        costs a round trip per row, and array parameters are adapted value by value in
        Python."""
        rows = sa.bindparam("rows", type_=sa.Text).cast(JSONB)
        r = sa.func.jsonb_array_elements(rows).table_valued("value").alias("r")
        value = r.c.value.op("->>")
        values = [sa.cast(value(sa.literal_column(str(i))), table.c[c].type) for i, c in enumerate(columns)]
        return self.insert(table).from_select(list(columns), sa.select(*values).select_from(r))

    def wait_checkpoints(self) -> None:
        """Wait for the background checkpointer, if any, to finish what it was asked."""
        if self._checkpointer is not None:
            self._checkpointer.wait_idle()

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with self._writers:
            if self._pinned is not None:
                self._pinned.close()
                self._pinned = None
        self.engine.dispose()


def _json_rows(rows: Sequence[Sequence[Any]]) -> dict[str, str]:
    return {"rows": orjson.dumps(rows).decode()}


# How a failed statement is classified (see `classify`): by SQLite's primary result code
# and PostgreSQL's SQLSTATE, never by message text.
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
