"""`edgepipe replay sql`: the archive as a data set, queried with DuckDB (the optional
extra `edgepipe[analytics]`).

The archive objects of a range are read exactly as every replay command reads them
(`archiver.replay.iter_objects`: listed from the bucket, each body checked against the
sha256 and row count of its own metadata; an unsound object is appended to `bad` and
skipped), and loaded into a table `events` of a DuckDB database held in memory for one
command and discarded after it: nothing goes back to the archive or to edgepipe's
database.

Loading: the rows of each object are decoded into typed rows (`SqlRow`: a row of the
wrong shape makes its object unsound, like any undecodable row), written as NDJSON to a
private temp directory laid out as the keys are, `dt=YYYY-MM-DD/hour=HH/part-….ndjson`,
and read from there by DuckDB's `read_json` with explicit column types and Hive
partitioning, which supplies `dt` and `hour` from the paths. Staged files are read and
deleted about every `STAGE_BYTES`, so the temp directory holds at most that much NDJSON
(and whatever DuckDB spills there when the table outgrows its memory limit). Only rows
with `from <= ts < to` are kept: the range cuts hours exactly as `replay export` does.

The table's columns are `COLUMNS` (the detail rows' fields plus `ts_ms`, `dt` and `hour`).
`ts` is a TIMESTAMP holding UTC (DuckDB's TIMESTAMP carries no zone; the session's time
zone is set to UTC as well), `ts_ms` the stored epoch milliseconds.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
import orjson

from archiver.objects import KEY_RE
from archiver.replay import Progress, iter_objects
from pipeline.bindings.archive import ObjectStore
from pipeline.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from duckdb import DuckDBPyConnection

MISSING_EXTRA = "replay sql needs the analytics extra: pip install 'edgepipe[analytics]'"
STAGE_BYTES = 64 * 1024 * 1024  # NDJSON staged on disk before DuckDB reads it into the table
FETCH_ROWS = 2000  # result rows fetched from DuckDB at a time

# The table `events`: (name, DuckDB type, meaning), in column order. The command's help and
# the README list the same; a test checks that `DESCRIBE events` gives exactly these.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("seq", "BIGINT", "the row's seq in traffic_events"),
    ("ts", "TIMESTAMP", "event time, UTC (no zone attached), millisecond precision"),
    ("ts_ms", "BIGINT", "event time as stored: epoch milliseconds"),
    ("id", "VARCHAR", "event id"),
    ("method", "VARCHAR", "HTTP method"),
    ("path", "VARCHAR", "normalised path (the aggregates count a row with overflow = 1 under __other__)"),
    ("overflow", "SMALLINT", "1 when the row is counted as __other__ in the aggregates, else 0"),
    ("status", "SMALLINT", "HTTP status (its class: status // 100)"),
    ("response_time_ms", "DOUBLE", "response time in ms"),
    ("host", "VARCHAR", "host ('' when none was given)"),
    ("colo", "VARCHAR", "edge location, NULL when none was given"),
    ("bytes", "BIGINT", "response bytes, NULL when none were given"),
    ("dt", "DATE", "UTC day of the object (its key's dt=)"),
    ("hour", "INTEGER", "UTC hour of the object, 0-23 (its key's hour=)"),
)
# How the staged NDJSON is typed as it is read (the fields of an archived row).
_FILE_COLUMNS = {
    "seq": "BIGINT", "ts": "BIGINT", "id": "VARCHAR", "method": "VARCHAR", "path": "VARCHAR", "overflow": "SMALLINT",
    "status": "SMALLINT", "response_time_ms": "DOUBLE", "host": "VARCHAR", "colo": "VARCHAR", "bytes": "BIGINT",
}  # fmt: skip
_SELECT = {name: name for name, _t, _m in COLUMNS} | {"ts": "epoch_ms(ts)", "ts_ms": "ts"}
_CREATE = "CREATE TABLE events (" + ", ".join(f"{name} {sql_type}" for name, sql_type, _m in COLUMNS) + ")"
_INSERT = (
    "INSERT INTO events SELECT " + ", ".join(f"{expr} AS {name}" for name, expr in _SELECT.items())
    + " FROM read_json($files, format = 'newline_delimited', hive_partitioning = true,"
    " hive_types = {'dt': 'DATE', 'hour': 'INTEGER'}, columns = "
    + "{" + ", ".join(f"'{name}': '{sql_type}'" for name, sql_type in _FILE_COLUMNS.items()) + "})"
    + " WHERE ts >= $lo AND ts < $hi"
)  # fmt: skip


class SqlRow(msgspec.Struct, gc=False):
    """An archived row as `events` takes it: every field typed, so that a row of the wrong
    shape makes its object unsound (named and skipped) instead of failing the load."""

    seq: int
    ts: int
    id: str
    method: str
    path: str
    overflow: int
    status: int
    response_time_ms: float
    host: str
    colo: str | None = None
    bytes: int | None = None


ROW_DECODER = msgspec.json.Decoder(SqlRow)
_ENCODER = msgspec.json.Encoder()


def duckdb_module() -> ModuleType:
    """The `duckdb` module, or a ConfigError (exit 2) naming the extra that provides it."""
    try:
        import duckdb
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return duckdb


@dataclass
class Loaded:
    """The in-memory database of one command and what went into its `events` table."""

    con: DuckDBPyConnection
    objects: int
    rows: int


def load(con: DuckDBPyConnection, objects: Iterable[tuple[str, list[SqlRow]]], lo_ms: int, hi_ms: int,
         workdir: Path, stage_bytes: int = STAGE_BYTES) -> tuple[int, int]:  # fmt: skip
    """Create `events` on `con` and fill it with the rows of `objects` ((key, rows) pairs of
    sound objects) with `lo_ms <= ts < hi_ms`, staging them under `workdir`: (objects, rows)."""
    con.execute(_CREATE)
    n_objects = n_rows = staged = 0
    files: list[str] = []
    stage = workdir / "stage"

    def flush() -> int:
        nonlocal staged
        if not files:
            return 0
        inserted = con.execute(_INSERT, {"files": files, "lo": lo_ms, "hi": hi_ms}).fetchone()
        shutil.rmtree(stage)
        files.clear()
        staged = 0
        return int(inserted[0]) if inserted else 0

    for key, rows in objects:
        n_objects += 1
        if not rows:
            continue
        m = KEY_RE.search(key)
        if m is None:  # iter_objects yields only keys of the archive's form
            raise ValueError(f"{key}: not an archive object key")
        folder = stage / f"dt={m[1]}" / f"hour={m[2]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{len(files):06d}-part-{m[3]}-{m[4]}.ndjson"  # unique even for keys alike but for prefix
        body = _ENCODER.encode_lines(rows)
        path.write_bytes(body)
        files.append(str(path))
        staged += len(body)
        if staged >= stage_bytes:
            n_rows += flush()
    n_rows += flush()
    return n_objects, n_rows


@contextmanager
def open_events(
    store: ObjectStore, prefix: str, start_s: float, end_s: float, bad: list[dict[str, str]],
    progress: Progress | None = None,
) -> Iterator[Loaded]:  # fmt: skip
    """An in-memory DuckDB database whose table `events` holds the archived rows with
    `start <= ts < end`, read as replay reads them (unsound objects appended to `bad`).
    Its temp directory (staging, DuckDB's spill files) and the database go on exit."""
    duckdb = duckdb_module()
    with tempfile.TemporaryDirectory(prefix="edgepipe-sql-") as tmp:
        workdir = Path(tmp)
        con = duckdb.connect(":memory:", config={"temp_directory": str(workdir / "spill")})
        try:
            with suppress(duckdb.Error):  # a build without ICU fails here: its TIMESTAMPTZ is UTC anyway
                con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ values and casts in UTC, whatever TZ says
            found = iter_objects(store, prefix, start_s, end_s, bad, ROW_DECODER, progress)
            objects, rows = load(con, found, int(start_s * 1000), int(end_s * 1000), workdir)
            yield Loaded(con, objects, rows)
        finally:
            con.close()


@dataclass
class Result:
    """A query's columns (names and DuckDB types) and its rows, fetched in chunks."""

    columns: list[str]
    types: list[str]
    chunks: Iterator[list[tuple[Any, ...]]]

    def rows(self) -> list[tuple[Any, ...]]:
        return [row for chunk in self.chunks for row in chunk]

    def duplicate_column(self) -> str | None:
        """A column name the result holds twice (a JSON object or a table cannot), or None."""
        seen: set[str] = set()
        for name in self.columns:
            if name in seen:
                return name
            seen.add(name)
        return None


def _sql_error(exc: Exception) -> ValidationError:
    """DuckDB's message as one line: its first paragraph (the statement excerpt and caret
    that follow it are dropped)."""
    first = str(exc).strip().split("\n\n", 1)[0]
    return ValidationError("SQL", " ".join(first.split()) or type(exc).__name__)


def query(con: DuckDBPyConnection, statement: str) -> Result:
    """Run `statement` (one or more SQL statements; the last one's result is returned). A
    DuckDB error, when running it or while its rows are fetched, is a ValidationError
    (exit 3) naming the problem. The first chunk is fetched at once, so that most errors
    come before anything is printed."""
    duckdb = duckdb_module()
    if not statement.strip():
        raise ValidationError("SQL", "no statement given")
    try:
        cursor = con.execute(statement)
        if cursor is None or cursor.description is None:  # comments only: no statement ran
            return Result([], [], iter(()))
        first = cursor.fetchmany(FETCH_ROWS)
    except duckdb.Error as exc:
        raise _sql_error(exc) from None
    columns = [d[0] for d in cursor.description]
    types = [str(d[1]) for d in cursor.description]

    def chunks() -> Iterator[list[tuple[Any, ...]]]:
        chunk = first
        while chunk:
            yield chunk
            if len(chunk) < FETCH_ROWS:
                return
            try:
                chunk = cursor.fetchmany(FETCH_ROWS)
            except duckdb.Error as exc:
                raise _sql_error(exc) from None

    return Result(columns, types, chunks())


def _iso(value: datetime) -> str:
    """RFC 3339 in UTC with a trailing Z (a naive timestamp is UTC, as `ts` is); seconds
    when whole, else milliseconds or microseconds as needed."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    spec = "seconds" if not value.microsecond else "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
    return value.isoformat(timespec=spec).replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """A result value as JSON takes it: timestamps as RFC 3339 strings in UTC, dates
    `YYYY-MM-DD`, times `HH:MM:SS`, decimals as numbers, intervals as seconds, UUIDs and
    blobs (hex) as strings, lists, structs and maps recursively."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    return str(value)


def csv_cell(value: Any) -> Any:
    """A result value as a CSV field: as in JSON, with NULL empty, booleans `true` /
    `false` and lists, structs and maps as JSON text."""
    value = plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def csv_text(rows: Iterable[tuple[Any, ...]], header: list[str] | None = None) -> str:
    """CSV lines of `rows` (after `header`, when given)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return buf.getvalue()


__all__ = ["COLUMNS", "Loaded", "Result", "csv_text", "duckdb_module", "load", "open_events", "plain", "query"]
