"""Backups in the DB binding: a consistent copy of edgepipe's tables as a byte stream
(`dump`), and a new database built from one (`restore`). What is done with the bytes
(compression, checksums, the object store) is the caller's business (`archiver.backup`).

Two payloads, one per source dialect:

* `sqlite` — the database file. SQLite's online backup API copies it page by page into a
  temp file beside the database, in ONE step inside a read transaction on a connection of
  its own (the row counts are read in the same transaction, so they describe the copy). In
  WAL mode a reader takes no lock a writer needs: the consumer commits on as usual. (A
  backup in several steps starts over whenever another connection commits between two
  steps, so under a consumer it would never finish.) The copy runs in C with the GIL
  released; the temp file is then streamed and deleted.
* `pgcopy` — pg_dump's plain format for data: per table `COPY "t" ("a", …) FROM stdin;`,
  the rows in COPY text format, `\\.`; every table is read in one REPEATABLE READ READ
  ONLY transaction (one snapshot), the server formats the rows.

Either payload restores into either dialect. The fast paths are SQLite's backup API again
(file into SQLite: the target's pages replaced in one go) and `COPY … FROM STDIN` of the
sections as they are (pgcopy into PostgreSQL); across dialects the rows are read (from the
file, or parsed from the COPY text) and inserted (`executemany` on SQLite, `COPY` rows on
PostgreSQL). The target must hold edgepipe's schema at the payload's revision and no rows
(the caller migrates it); a restore commits whole or not at all, and only when every
table's row count equals the one expected. On PostgreSQL the sequences behind the integer
keys are moved past the restored rows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pipeline.bindings.db.errors import classify, translate_errors
from pipeline.errors import BindingError, EdgepipeError, IntegrityError
from pipeline.schema import metadata

if TYPE_CHECKING:
    from pipeline.bindings.db.database import Database

SQLITE, PGCOPY = "sqlite", "pgcopy"
PAYLOADS = (SQLITE, PGCOPY)
CHUNK = 1 << 20
INSERT_ROWS = 5000  # rows per executemany when inserting across dialects
TMP_PREFIX = ".edgepipe-backup-"  # temp files beside a SQLite database
STALE_TMP_S = 86_400.0  # temp files this old were left by a killed process
_COPY_HEADER = re.compile(rb'COPY "([a-z_][a-z0-9_]*)" \(([^)]*)\) FROM stdin;')
_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_ESCAPE_RE = re.compile(rb"\\(.)", re.S)

Rows = Iterator[tuple[Any, ...]]
Source = Iterator[tuple[str, list[str], Iterator[Any]]]  # (table, columns, rows or raw COPY text pieces)


def table_names() -> list[str]:
    """edgepipe's tables, in dependency order."""
    return [str(t.name) for t in metadata.sorted_tables]


@dataclass
class Dump:
    """A dump in progress: `chunks` streams the payload; `tables` (rows per table) is
    complete once `chunks` is exhausted; `size` is the payload's size when known ahead."""

    payload: str
    schema: str
    tables: dict[str, int]
    size: int | None
    chunks: Iterator[bytes]


@contextlib.contextmanager
def _driver_errors(what: str) -> Iterator[None]:
    """Driver exceptions raised outside SQLAlchemy (sqlite3, psycopg, the file system) as
    edgepipe's errors, like `translate_errors` does for SQLAlchemy's."""
    kinds: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    if "psycopg" in sys.modules:
        kinds += (sys.modules["psycopg"].Error,)
    try:
        with translate_errors():
            yield
    except EdgepipeError:
        raise
    except kinds as exc:
        raise classify(exc)(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def sqlite_path(db: Database) -> Path:
    """The file of a SQLite database; BindingError for an in-memory one."""
    name = db.engine.url.database
    if not name or name == ":memory:":
        raise BindingError("an in-memory SQLite database has no file to back up or restore into")
    return Path(name)


def _remove_stale(directory: Path) -> None:
    limit = time.time() - STALE_TMP_S
    for path in directory.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < limit:
                path.unlink()


@contextlib.contextmanager
def _temp_file(directory: Path | None) -> Iterator[Path]:
    if directory is not None:
        _remove_stale(directory)
    fd, name = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".db")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(name + suffix).unlink(missing_ok=True)


def _file_chunks(path: Path) -> Generator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def occupied(db: Database) -> list[str]:
    """edgepipe's tables that hold at least one row."""
    with translate_errors(), db.read() as conn:
        present = set(sa.inspect(conn).get_table_names())
        return [
            t for t in table_names() if t in present and conn.exec_driver_sql(f'SELECT 1 FROM "{t}" LIMIT 1').first()
        ]


# -- dump ---------------------------------------------------------------------------------


@contextlib.contextmanager
def dump(db: Database, on_snapshot: Callable[[], None] | None = None) -> Iterator[Dump]:
    """A consistent copy of edgepipe's tables (see the module doc). `on_snapshot` is called
    once the snapshot is fixed, while it is held."""
    hook = on_snapshot or (lambda: None)
    with _driver_errors("backup"):
        if db.dialect == "sqlite":
            with _sqlite_dump(db, hook) as out:
                yield out
        else:
            with _pg_dump(db, hook) as out:
                yield out


def _revision(cursor: Any) -> str:
    try:
        row = cursor.execute("SELECT version_num FROM alembic_version").fetchone()
    except Exception as exc:
        raise BindingError(f"the database has no edgepipe schema to back up: {exc}") from None
    if row is None:
        raise BindingError("the database has no edgepipe schema to back up (run `edgepipe init`)")
    return str(row[0])


@contextlib.contextmanager
def _sqlite_dump(db: Database, on_snapshot: Callable[[], None]) -> Iterator[Dump]:
    path = sqlite_path(db)
    with _temp_file(path.parent) as tmp:
        raw = db.engine.raw_connection()  # a connection of its own: never the pinned writer
        try:
            con: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
            con.execute("BEGIN")
            try:
                schema = _revision(con)
                counts = _sqlite_counts(con)
                on_snapshot()
                target = sqlite3.connect(tmp)
                try:
                    con.backup(target)  # one step, in this read transaction: the snapshot counted above
                finally:
                    target.close()
            finally:
                con.execute("ROLLBACK")
        finally:
            raw.close()
        chunks = _file_chunks(tmp)
        try:
            yield Dump(SQLITE, schema, counts, tmp.stat().st_size, chunks)
        finally:
            chunks.close()


@contextlib.contextmanager
def _pg_dump(db: Database, on_snapshot: Callable[[], None]) -> Iterator[Dump]:
    raw = db.engine.raw_connection()
    pg: Any = raw.driver_connection
    try:
        pg.rollback()  # the next statement begins the transaction
        cur = pg.cursor()
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        schema = _revision(cur)
        names = [t for t in table_names() if cur.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0]]
        counts: dict[str, int] = {}
        on_snapshot()
        chunks = _pg_chunks(cur, names, schema, counts)
        try:
            yield Dump(PGCOPY, schema, counts, None, chunks)
        finally:
            with contextlib.suppress(Exception):
                chunks.close()
        pg.rollback()
    except BaseException:
        raw.invalidate()  # a COPY cut short leaves the connection unusable
        raise
    finally:
        raw.close()


def _pg_chunks(cur: Any, names: list[str], schema: str, counts: dict[str, int]) -> Generator[bytes]:
    yield f"-- edgepipe backup: PostgreSQL COPY sections (pgcopy), schema {schema}\n".encode()
    for name in names:
        cur.execute(f'SELECT * FROM "{name}" LIMIT 0')
        columns = ", ".join(f'"{d.name}"' for d in cur.description)
        yield f'COPY "{name}" ({columns}) FROM stdin;\n'.encode()
        rows, buf = 0, bytearray()
        with cur.copy(f'COPY "{name}" ({columns}) TO STDOUT') as copy:
            for data in copy:  # one message a row: gathered into chunks
                buf += data
                if len(buf) >= CHUNK:
                    rows += buf.count(b"\n")
                    yield bytes(buf)
                    buf.clear()
        rows += buf.count(b"\n")
        counts[name] = rows
        yield bytes(buf) + b"\\.\n"


# -- restore ------------------------------------------------------------------------------


def restore(
    db: Database, payload: str, chunks: Iterable[bytes], expected: dict[str, int], workdir: Path | None = None
) -> dict[str, int]:
    """Load a payload into `db` (schema at the payload's revision, no rows: the caller's
    checks). Returns rows per table; IntegrityError, with nothing committed, when a count
    differs from `expected` or the payload does not parse. A SQLite file is unpacked into
    a temp file in `workdir` (default: beside a SQLite target, else the system's temp
    directory)."""
    if payload not in PAYLOADS:
        raise IntegrityError(f"unknown backup payload {payload!r} (known: {', '.join(PAYLOADS)})")
    with _driver_errors("restore"):
        if payload == PGCOPY:
            return _load(db, _copy_sections(iter(chunks)), expected)
        directory = workdir or (sqlite_path(db).parent if db.dialect == "sqlite" else None)
        with _temp_file(directory) as tmp:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            src = sqlite3.connect(tmp.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                _check_file(src)
                if db.dialect == "sqlite":
                    return _replace_sqlite(db, src, expected)
                return _load(db, _file_tables(src), expected)
            finally:
                src.close()


def _check_counts(counts: dict[str, int], expected: dict[str, int]) -> None:
    for name in sorted(set(counts) | set(expected)):
        if counts.get(name, 0) != expected.get(name, 0):
            held, said = counts.get(name, 0), expected.get(name, 0)
            raise IntegrityError(f"table {name}: the backup holds {held:,} rows, its manifest says {said:,}")


def _check_file(src: sqlite3.Connection) -> None:
    try:
        result = src.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"the backed-up database file is damaged: {exc}") from None
    if result != "ok":
        raise IntegrityError(f"the backed-up database file is damaged: {result}")


def _sqlite_tables(con: sqlite3.Connection) -> list[str]:
    present = {r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    return [name for name in table_names() if name in present]


def _sqlite_counts(con: sqlite3.Connection) -> dict[str, int]:
    return {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in _sqlite_tables(con)}


def _file_tables(src: sqlite3.Connection) -> Source:
    for name in _sqlite_tables(src):
        cur = src.execute(f'SELECT * FROM "{name}"')
        yield name, [d[0] for d in cur.description], iter(cur)


def _replace_sqlite(db: Database, src: sqlite3.Connection, expected: dict[str, int]) -> dict[str, int]:
    """Replace the target's pages with the file's (SQLite's backup API, one step) after
    checking its counts. The target's own connections are closed first; it leaves WAL mode
    for the copy (a WAL database cannot take another page size) and returns to it."""
    counts = _sqlite_counts(src)
    _check_counts(counts, expected)
    db.dispose()
    target = sqlite3.connect(sqlite_path(db), isolation_level=None)
    try:
        target.execute("PRAGMA journal_mode=DELETE").fetchall()
        src.backup(target)
        target.execute("PRAGMA journal_mode=WAL").fetchall()
    finally:
        target.close()
    return counts


def _load(db: Database, source: Source, expected: dict[str, int]) -> dict[str, int]:
    """Insert every table of `source` into `db` in one transaction, checked against `expected`."""
    counts: dict[str, int] = {}
    with db.transaction() as conn:
        driver: Any = conn.connection.driver_connection
        for name, columns, rows in source:
            table = metadata.tables.get(name)
            if table is None or name in counts or not set(columns) <= set(table.columns.keys()):
                raise IntegrityError(f"the backup holds an unexpected table section: {name} ({', '.join(columns)})")
            quoted = ", ".join(f'"{c}"' for c in columns)
            if db.dialect == "postgresql":
                counts[name] = _copy_into_pg(driver, name, quoted, columns, rows)
            else:
                counts[name] = _insert_sqlite(driver, name, quoted, columns, rows)
        _check_counts(counts, expected)
        if db.dialect == "postgresql":
            _reset_sequences(driver, list(counts))
    return counts


def _copy_into_pg(pg: Any, name: str, quoted: str, columns: list[str], rows: Iterator[Any]) -> int:
    """`rows` are raw COPY text pieces (a pgcopy section) or value tuples (read elsewhere)."""
    cur = pg.cursor()
    with cur.copy(f'COPY "{name}" ({quoted}) FROM STDIN') as copy:
        for item in rows:
            if isinstance(item, bytes):
                copy.write(item)
            else:
                copy.write_row(item)
    return int(cur.rowcount)


def _insert_sqlite(con: Any, name: str, quoted: str, columns: list[str], rows: Iterator[Any]) -> int:
    first = next(rows, None)
    if first is None:
        return 0
    rows = _parse_copy(name, columns, rows, first) if isinstance(first, bytes) else _chained(first, rows)
    sql = f'INSERT INTO "{name}" ({quoted}) VALUES ({", ".join("?" * len(columns))})'
    n = 0
    while batch := [row for _, row in zip(range(INSERT_ROWS), rows, strict=False)]:
        con.executemany(sql, batch)
        n += len(batch)
    return n


def _chained(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _reset_sequences(pg: Any, names: list[str]) -> None:
    """Move each serial column's sequence past the restored rows (COPY does not)."""
    cur = pg.cursor()
    for name in names:
        for column in metadata.tables[name].primary_key.columns:
            seq = cur.execute("SELECT pg_get_serial_sequence(%s, %s)", (name, column.name)).fetchone()[0]
            if seq is not None:
                top = f'max("{column.name}")'
                cur.execute(f'SELECT setval(%s, coalesce({top}, 1), {top} IS NOT NULL) FROM "{name}"', (seq,))


# -- the pgcopy text format ---------------------------------------------------------------


class _Stream:
    """Lines and `\\.`-terminated sections over a stream of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buf = chunks, b""

    def more(self) -> bool:
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes | None:
        while (end := self.buf.find(b"\n")) < 0:
            if not self.more():
                if self.buf:
                    raise IntegrityError("the backup ends inside a line (truncated)")
                return None
        line, self.buf = self.buf[:end], self.buf[end + 1 :]
        return line

    def section(self, name: str) -> Iterator[bytes]:
        """The data of a section, in pieces of whole lines, up to its `\\.` line."""
        while True:
            if self.buf.startswith(b"\\.\n"):
                self.buf = self.buf[3:]
                return
            end = self.buf.find(b"\n\\.\n")
            if end >= 0:
                piece, self.buf = self.buf[: end + 1], self.buf[end + 4 :]
                yield piece
                return
            last = self.buf.rfind(b"\n")
            if last >= 0:
                piece, self.buf = self.buf[: last + 1], self.buf[last + 1 :]
                yield piece
            if not self.more():
                raise IntegrityError(f"the backup ends inside the rows of {name} (truncated)")


def _copy_sections(chunks: Iterator[bytes]) -> Source:
    stream = _Stream(chunks)
    while (line := stream.line()) is not None:
        if not line or line.startswith(b"--"):
            continue
        match = _COPY_HEADER.fullmatch(line)
        if match is None:
            raise IntegrityError(f"unexpected line in the backup: {line[:80]!r}")
        name = match[1].decode()
        columns = [c.strip().strip('"') for c in match[2].decode().split(",")]
        data = stream.section(name)
        yield name, columns, data
        for _ in data:  # a consumer that stopped early: skip to the section's end
            pass


def _parse_copy(name: str, columns: list[str], pieces: Iterator[bytes], first: bytes) -> Rows:
    """Rows of COPY text pieces as Python values of the target's column types."""
    table = metadata.tables[name]
    convert = [_converter(table.columns[c].type) for c in columns]
    for piece in _chained(first, pieces):
        for line in piece.split(b"\n")[:-1]:  # pieces hold whole lines
            fields = line.split(b"\t")
            if len(fields) != len(convert):
                raise IntegrityError(f"a row of {name} has {len(fields)} fields, {len(convert)} expected")
            yield tuple(None if f == b"\\N" else conv(_unescape(f)) for f, conv in zip(fields, convert, strict=True))


def _unescape(field: bytes) -> bytes:
    if b"\\" not in field:
        return field
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m[1], m[1]), field)


def _converter(column_type: Any) -> Callable[[bytes], Any]:
    if isinstance(column_type, sa.LargeBinary):
        return lambda b: bytes.fromhex(b[2:].decode())  # bytea's hex output: \x0a0b…
    if isinstance(column_type, sa.Integer):
        return int
    if isinstance(column_type, sa.Float):
        return float
    return lambda b: b.decode()
