"""PostgreSQL: batches of rows by binary COPY, straight into a table or into a staging table.

`COPY … FROM STDIN (FORMAT BINARY)` is the cheapest way to hand PostgreSQL many rows: psycopg
writes each value in C, in binary, the server reads it without parsing text, and it writes
the heap rows a page at a time (one WAL record per page, not per row). Two uses:

- `copy_rows`, straight into the table, for rows expected to be all new (`Bulk.insert_new`
  with `likely_new`). COPY cannot skip a stored key, so the caller runs it in a savepoint
  and falls back to an upsert when a key is refused. For 1000 events it took ~1.4 ms of
  server time off a plain `INSERT … SELECT` from a JSONB array (whose server-side `->>` and
  cast of every value cost more than the COPY's extra round trip).
- `staged`, into a temporary staging table of the connection's own, where one
  `INSERT … SELECT … ON CONFLICT` takes the rows (`Bulk.upsert_add_rows`). For the consumer's
  hourly rows (31 columns, nearly all integers) this took ~2.4 ms off a batch of 1000 events
  against the same statement reading a JSONB array, with four round trips instead of one
  (the create-or-empty below, the COPY's two, the statement) and a truncation at commit;
  below ~250 rows the one statement is as cheap (`Bulk`'s `STAGE_MIN_ROWS`).

Binary COPY takes each value as its column's exact type, and psycopg writes an int past a
SMALLINT or INTEGER column's range wrapped around, silently (40000 arrives as -25536). So
`copy_rows` checks those columns' values first and declines (returns False, having done
nothing) when one is out of range; the caller's other path then refuses it as PostgreSQL
does. (A value of the wrong Python type is no such risk: psycopg raises TypeError.) The
staging table's columns are typed loosely instead (integers BIGINT, floats DOUBLE
PRECISION, strings TEXT, bytes BYTEA, no constraints): the statement reading it casts each
value to its column's type, so a value the target refuses (out of range, too long, NUL in
text) fails there with the SQLSTATE any insert gets, a data error, not a fault. A Python
int past 64 bits fails in psycopg as `OverflowError`, which the binding classifies the
same way.

The staging table of a table, `pg_temp.edgepipe_stage_<table>`, is set up by
`CREATE TEMPORARY TABLE IF NOT EXISTS … ON COMMIT DELETE ROWS; DELETE FROM …` before each
use, in one round trip: it exists after the first use on a connection (until the connection
closes, or the transaction that created it rolls back), and it is emptied at every commit
and before every use (rows of an earlier use in the same transaction; after a commit, a
no-op). The connection's role needs the TEMPORARY privilege on the database, which
PostgreSQL grants to every role by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.bindings.db.fastpath import FastPath

# The COPY type psycopg writes for a column of each kind, straight into it (its exact type,
# and for the narrower integers the range psycopg writes faithfully) and into a staging
# table (its loose type there). Checked in order: a Float is also a Numeric, a SmallInteger
# or a BigInteger also an Integer.
_Kind = tuple[type[sa.types.TypeEngine[Any]], str, tuple[int, int] | None, sa.types.TypeEngine[Any], str]
_KINDS: tuple[_Kind, ...] = (
    (sa.SmallInteger, "int2", (-(2**15), 2**15 - 1), sa.BigInteger(), "int8"),
    (sa.BigInteger, "int8", None, sa.BigInteger(), "int8"),
    (sa.Integer, "int4", (-(2**31), 2**31 - 1), sa.BigInteger(), "int8"),
    (sa.Double, "float8", None, sa.Double(), "float8"),
    (sa.String, "text", None, sa.Text(), "text"),
    (sa.LargeBinary, "bytea", None, sa.LargeBinary(), "bytea"),
)


def _kind(column: sa.Column[Any]) -> _Kind | None:
    type_ = column.type
    if isinstance(type_, sa.Float) and not isinstance(type_, sa.Double):
        # FLOAT is double precision unless given a precision of at most 24 (then REAL)
        type_ = sa.Double() if (type_.precision or 53) > 24 else type_
    for kind in _KINDS:
        if isinstance(type_, kind[0]):
            return kind
    return None


def _within(values: list[Any], low: int, high: int) -> bool:
    """Whether `values` are all ints (or None) from `low` to `high`."""
    numbers = [v for v in values if v is not None] if None in values else values
    return not numbers or (set(map(type, numbers)) == {int} and low <= min(numbers) and max(numbers) <= high)


class _Copy:
    """A table's COPY statements, per column list, and its staging table."""

    __slots__ = ("prepare", "stage", "stage_types", "types")

    def __init__(self, types: dict[str, tuple[str, tuple[int, int] | None]], stage: sa.Table, prepare: str,
                 stage_types: dict[str, str]) -> None:  # fmt: skip
        self.types, self.stage, self.prepare, self.stage_types = types, stage, prepare, stage_types


class PgCopy(FastPath):
    """Binary COPY into tables and per-connection staging tables (PostgreSQL)."""

    def copy_rows(
        self, conn: Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        """COPY `rows` (tuples in `columns` order) into `table`, in the given order. False,
        having done nothing, when a column is of a type this does not write, or a SMALLINT
        or INTEGER column holds a value psycopg would not write as it is (out of range, or
        not an int). A value of another Python type than its column's raises TypeError,
        as psycopg does."""
        info = self._copy_info(table)
        types = []
        for i, name in enumerate(columns):
            found = info.types.get(name)
            if found is None:
                return False
            copy_type, bounds = found
            if bounds is not None and not _within(list(map(itemgetter(i), rows)), *bounds):
                return False
            types.append(copy_type)
        sql = self.cached(("copy", table.name, tuple(columns)), lambda: self._copy_sql(table, columns))
        self._copy(conn, sql, types, rows)
        return True

    def staged(
        self, conn: Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> sa.Table | None:
        """Copy `rows` (tuples in `columns` order) into `table`'s staging table, emptied
        first, and return that table (a `sa.Table` whose columns are named as `table`'s),
        for a statement of the caller's transaction to read. None, having done nothing,
        when a column is of a type staging does not take (the caller then sends the rows
        another way)."""
        info = self._copy_info(table)
        if any(c not in info.stage_types for c in columns):
            return None
        driver = conn.connection.driver_connection
        with self.driver_errors(info.prepare):
            driver.execute(info.prepare)  # type: ignore[union-attr]
        sql = self.cached(("copy_stage", table.name, tuple(columns)), lambda: self._copy_sql(info.stage, columns))
        self._copy(conn, sql, [info.stage_types[c] for c in columns], rows)
        return info.stage

    def _copy(self, conn: Connection, sql: str, types: list[str], rows: Sequence[Sequence[Any]]) -> None:
        driver = conn.connection.driver_connection
        with self.driver_errors(sql), driver.cursor() as cursor, cursor.copy(sql) as out:  # type: ignore[union-attr]
            out.set_types(types)
            for row in rows:
                out.write_row(row)

    def _copy_info(self, table: sa.Table) -> _Copy:
        info: _Copy = self.cached(("copy_info", table.name), lambda: self._build_copy_info(table))
        return info

    def _build_copy_info(self, table: sa.Table) -> _Copy:
        types, stage_columns, stage_types = {}, [], {}
        for col in table.columns:
            kind = _kind(col)
            if kind is not None:
                _, copy_type, bounds, loose, loose_copy_type = kind
                types[col.name] = (copy_type, bounds)
                stage_columns.append(sa.Column(col.name, loose))
                stage_types[col.name] = loose_copy_type
        stage = sa.Table(
            f"edgepipe_stage_{table.name}",
            sa.MetaData(),
            *stage_columns,
            schema="pg_temp",
            prefixes=["TEMPORARY"],
            postgresql_on_commit="DELETE ROWS",
        )
        create = sa.schema.CreateTable(stage, if_not_exists=True).compile(dialect=self.engine.dialect)
        name = self.engine.dialect.identifier_preparer.format_table(stage)
        return _Copy(types, stage, f"{str(create).strip()}; DELETE FROM {name}", stage_types)

    def _copy_sql(self, table: sa.Table, columns: Sequence[str]) -> str:
        quote = self.engine.dialect.identifier_preparer
        names = ", ".join(quote.quote(c) for c in columns)
        return f"COPY {quote.format_table(table)} ({names}) FROM STDIN (FORMAT BINARY)"
