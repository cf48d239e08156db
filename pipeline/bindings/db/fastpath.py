"""The statement cache and the raw-cursor fast path of `Database`.

Hot paths run statements built once per shape (`cached`): building SQLAlchemy expressions
per batch costs more than the rows they write. They run them on the driver's own cursor
(`executemany`, `execute`, `fetchall`, `stream`, `stream_chunks`), compiled once per
statement and parameter list, skipping SQLAlchemy's per-statement work (tens of µs, more
than a small batch's rows cost). Driver errors are wrapped as SQLAlchemy would have, so
`translate_errors` classifies them like any other.

On PostgreSQL a statement run here is a server-side prepared statement from its first run
on a connection (psycopg would prepare it only at its sixth), and its rows come back in
binary (no text round trip for numbers and bytea: a queue take of 1000 messages costs a
quarter less). A statement may ask for a generic plan (`generic`): see `_execute_pg`.

Rows come back as the driver's plain tuples, without SQLAlchemy's result processing. So
that no column can silently come back unconverted (a DateTime as text, a Boolean as an
int, a Numeric as a float), a statement whose rows are fetched is checked the first time
it is: if SQLAlchemy would convert any of its result columns on this dialect, the fast
path refuses it with `UnprocessedColumnError`. A type whose conversion depends on the
type the driver reports (psycopg's Float and Numeric) is checked against that type at the
statement's first run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.bindings.db.engine import Dialect


class UnprocessedColumnError(TypeError):
    """A statement run on the fast path selects a column whose type needs SQLAlchemy's
    result processing on this dialect: run it with `conn.execute` instead, or select the
    column as a type that needs none (a cast)."""


# A column the fast path must check against the driver's type: (position, name, type).
_Deferred = tuple[int, str, sa.types.TypeEngine[Any]]


class _Compiled:
    """A statement compiled for the fast path, with what its rows' check still needs."""

    __slots__ = ("deferred", "shape", "sql", "stmt")

    def __init__(self, stmt: Any, sql: str, shape: Any) -> None:
        self.stmt = stmt  # held: the cache is keyed by its id(), which must not be reused
        self.sql, self.shape = sql, shape
        # Result columns still to check: None before the first fetch, then those whose
        # processing depends on the driver's type, () once all are known to need none.
        self.deferred: tuple[_Deferred, ...] | None = None


def result_columns(stmt: Any) -> list[Any]:
    """The columns of a statement's rows: a SELECT's selected columns, a DML statement's
    RETURNING columns (none for plain text)."""
    columns: Any = getattr(stmt, "selected_columns", None)
    if columns is None:
        columns = getattr(stmt, "exported_columns", ())
    return list(columns)


class FastPath(Dialect):
    """The statement cache and the statements run on the driver's cursor."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self._stmt_cache: dict[tuple[Any, ...], Any] = {}
        self._streams = 0  # names server-side cursors apart

    def cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """A statement (or anything) built once per key for this database."""
        hit = self._stmt_cache.get(key)
        if hit is None:
            hit = self._stmt_cache[key] = build()
        return hit

    def _compiled(self, stmt: Any, columns: Sequence[str], rows: bool = False) -> _Compiled:
        """`stmt` compiled once for bind parameters `columns` (plus any constants bound in
        the statement itself), its rows checked (see `_refuse_processed`) when `rows`. The
        parameter shape is None when the driver takes the values in `columns` order as they
        are (see `_shaped`)."""
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
            hit = self._stmt_cache[key] = _Compiled(stmt, str(compiled), shape)
        if rows and hit.deferred is None:
            hit.deferred = self._refuse_processed(stmt)
        return hit

    def _refuse_processed(self, stmt: Any) -> tuple[_Deferred, ...]:
        """Raise UnprocessedColumnError if SQLAlchemy would process a result column of
        `stmt` on this dialect; return the columns whose processing depends on the type the
        driver reports (checked at the first run: `_check_driver_types`)."""
        deferred = []
        for i, col in enumerate(result_columns(stmt)):
            name = str(col.key) if col.key else f"#{i + 1}"
            try:
                processor = col.type._cached_result_processor(self.engine.dialect, None)
            except Exception:  # its processing depends on the driver's type code
                deferred.append((i, name, col.type))
                continue
            if processor is not None:
                self._refuse(name, col.type, processor)
        return tuple(deferred)

    def _check_driver_types(self, hit: _Compiled, description: Sequence[Any] | None) -> None:
        """Check `hit`'s deferred columns against the types in the cursor's description."""
        for i, name, type_ in hit.deferred or ():
            if description is None or i >= len(description):
                self._refuse(name, type_, "unknown: the result has no such column")
            try:
                processor = type_._cached_result_processor(self.engine.dialect, description[i][1])
            except Exception as exc:
                self._refuse(name, type_, f"{type(exc).__name__}: {exc}")
            if processor is not None:
                self._refuse(name, type_, processor)
        hit.deferred = ()

    def _refuse(self, name: str, type_: Any, processor: Any) -> NoReturn:
        raise UnprocessedColumnError(
            f"fast path: result column {name!r} of type {type_!r} needs SQLAlchemy's result processing on "
            f"{self.engine.dialect.name}+{self.engine.dialect.driver} ({getattr(processor, '__name__', processor)}), "
            "which the driver's cursor skips: run the statement with conn.execute(), or select the column as a type "
            "that needs none"
        )

    @staticmethod
    def _shaped(shape: Any, row: Sequence[Any]) -> Any:
        if shape is None:
            return row
        if isinstance(shape, list):  # positional: reorder, fill in constants
            return tuple(row[i] if i >= 0 else const for i, const in shape)
        names, consts = shape
        return dict(zip(names, row, strict=True)) | consts

    @contextmanager
    def driver_errors(self, sql: str) -> Iterator[None]:
        """Driver errors raised inside, wrapped as SQLAlchemy would have wrapped them (as
        `_run` does), for statements run on the driver by other means (a COPY)."""
        try:
            yield
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error) from exc

    def _run(
        self, conn: Connection, stmt: Any, columns: Sequence[str], values: Any, many: bool, fetch: bool,
        generic: bool = False, redoable: bool = False,
    ) -> Any:  # fmt: skip
        hit = self._compiled(stmt, columns, fetch)
        sql, shape = hit.sql, hit.shape
        driver = conn.connection.driver_connection
        cursor = driver.cursor()  # type: ignore[union-attr]
        try:
            if many:
                cursor.executemany(sql, list(values) if shape is None else [self._shaped(shape, r) for r in values])
            elif self.dialect == "postgresql":
                _execute_pg(driver, cursor, sql, self._shaped(shape, values), fetch, generic, redoable)
            else:
                cursor.execute(sql, self._shaped(shape, values))
            if not fetch:
                return cursor.rowcount
            if hit.deferred:
                self._check_driver_types(hit, cursor.description)
            return cursor.fetchall()
        except self.engine.dialect.loaded_dbapi.Error as exc:  # as if SQLAlchemy had run it
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error) from exc
        finally:
            cursor.close()

    # The methods below run a statement on the driver's cursor. Bind parameters are
    # `columns`, given as tuples in that order; rows come back as the driver's plain tuples
    # (see the module's docstring).

    def executemany(self, conn: Connection, stmt: Any, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Run an INSERT-shaped statement over rows; returns the driver's row count."""
        return self._run(conn, stmt, columns, rows, many=True, fetch=False)

    def execute(self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = ()) -> int:
        """Run a statement once; returns the driver's row count."""
        return self._run(conn, stmt, columns, values, many=False, fetch=False)

    def fetchall(
        self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = (),
        generic: bool = False, redoable: bool = False,
    ) -> list[Any]:  # fmt: skip
        """Run a SELECT (or … RETURNING) once; returns its rows. PostgreSQL (see
        `_execute_pg`): `generic` plans it for any parameter values, never from the values
        at hand; `redoable` declares the open transaction redoable."""
        return self._run(conn, stmt, columns, values, many=False, fetch=True, generic=generic, redoable=redoable)

    def send(
        self, conn: Connection, stmt: Any, columns: Sequence[str] = (), values: Sequence[Any] = (),
        generic: bool = False, redoable: bool = False,
    ) -> Callable[[], list[Any]]:  # fmt: skip
        """PostgreSQL: send what `fetchall` would run, and return at once, with the
        function that waits for its rows. The statement goes in a pipeline left open
        (psycopg's pipeline mode): the server runs it while the caller does something else.
        Nothing else may run on `conn` until the rows were asked for."""
        hit = self._compiled(stmt, columns, rows=True)
        driver: Any = conn.connection.driver_connection
        cursor, pipeline = driver.cursor(), driver.pipeline()
        with self.driver_errors(hit.sql):
            pipeline.__enter__()
            try:
                _send_pg(driver, cursor, hit.sql, self._shaped(hit.shape, values), True, generic, redoable)
            except BaseException:
                pipeline.__exit__(*sys.exc_info())
                cursor.close()
                raise

        def rows() -> list[Any]:
            try:
                with self.driver_errors(hit.sql):
                    pipeline.__exit__(None, None, None)  # sync: wait for the results
                    if hit.deferred:
                        self._check_driver_types(hit, cursor.description)
                    return cursor.fetchall()
            finally:
                cursor.close()

        return rows

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
        hit = self._compiled(stmt, columns, rows=True)
        sql = hit.sql
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
            cursor.execute(sql, self._shaped(hit.shape, values))
            if hit.deferred:
                self._check_driver_types(hit, cursor.description)
            while rows := cursor.fetchmany(size):
                yield rows
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error) from exc
        finally:
            cursor.close()


# `plan_cache_mode` for one statement, and back to what it was (SET LOCAL: to the end of the
# transaction at most); a redoable transaction's commit.
_GENERIC_PLAN = "SET LOCAL plan_cache_mode = force_generic_plan"
_DEFAULT_PLAN = "SET LOCAL plan_cache_mode TO DEFAULT"
_REDOABLE = "SET LOCAL synchronous_commit = off"


def _execute_pg(driver: Any, cursor: Any, sql: str, params: Any, fetch: bool, generic: bool, redoable: bool) -> None:
    """Run a statement on psycopg: prepared from its first run, rows in binary.

    `generic` plans it for any parameter values: PostgreSQL's first five runs of a prepared
    statement are planned for their values from the table's statistics, and where these
    are missing or stale (a queue table filled faster than autovacuum analyses it) the
    estimate can be far off. A queue take (`ORDER BY seq LIMIT n FOR UPDATE SKIP LOCKED`)
    was planned as a scan and sort of the whole table (~100 ms at 200,000 messages)
    instead of a walk of its primary key (~1 ms).

    `redoable` declares the open transaction redoable: a crash may lose it whole without
    harm, because whatever it did is done again (it took queue messages inside itself, and
    a lost commit gives them back, as a rollback would). PostgreSQL then returns from its
    commit without waiting for the WAL to reach the disk (`synchronous_commit = off` for
    this transaction): the commit is as atomic as any, and the next commit that does wait
    (any other transaction's) makes it durable too; a crash before that loses at most the
    last few of these transactions (three WAL writer delays: 0.6 s by default). The wait
    is a WAL flush a commit, 0.5-1.5 ms on the development machine, several on a busy
    disk. (SQLite's commits do not wait for the disk.)

    The settings travel in one pipeline with the statement: no round trip of their own."""
    if not generic and not redoable:
        cursor.execute(sql, params, prepare=True, binary=fetch)
        return
    with driver.pipeline():
        _send_pg(driver, cursor, sql, params, fetch, generic, redoable)


def _send_pg(driver: Any, cursor: Any, sql: str, params: Any, fetch: bool, generic: bool, redoable: bool) -> None:
    """`_execute_pg`'s statements, in the pipeline open on `driver`."""
    if redoable:
        driver.execute(_REDOABLE)
    if generic:
        driver.execute(_GENERIC_PLAN)
    cursor.execute(sql, params, prepare=True, binary=fetch)
    if generic:
        driver.execute(_DEFAULT_PLAN)
