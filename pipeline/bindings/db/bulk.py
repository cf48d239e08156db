"""Bulk writes of `Database`: insert-if-new with the positions inserted, deletes by key,
and additive upserts.

These are the consumer's and the aggregator's per-batch statements, where the dialects
differ most: SQLite takes an executemany on the driver's cursor (one prepared statement,
no round trips) and reads the rest from the write lock it holds; PostgreSQL takes a whole
batch as one statement and one parameter (a JSONB array of rows, or an array of keys), or
by binary COPY (pgcopy.py), since an executemany costs a round trip per row there. Its
statements are server-side prepared statements from their first run (see `FastPath`).

**Lock order (PostgreSQL).** Several workers may write one database at once. A multi-row
`INSERT … SELECT … ON CONFLICT` (or a COPY) takes its row locks one row at a time, in the
order its rows come, and holds them to the commit: two transactions upserting an
overlapping set of keys in different orders can each hold a row the other waits for, and
PostgreSQL then aborts one (`deadlock detected`). So every batch written here is written
in the order of its conflict key: `ORDER BY` the key in the statement's SELECT, strings
in byte order (`_key_order`), or, for a COPY, the rows sorted by Python first, which is the
same order. Every writer then locks any two keys in the same order, and waits instead of
deadlocking. This covers the additive upserts (`path_stats_hourly`, `counters`, and any
table given to `upsert_add_rows`) and the insert-if-new of events (a key delivered twice,
to two workers, in different batches); tests/test_pg_concurrency.py holds it to that.
SQLite has one writer at a time: there the order does not matter and is left as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.bindings.db.pgcopy import PgCopy

UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
_SAVEPOINT = "SAVEPOINT edgepipe_insert_new"
_ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT edgepipe_insert_new"
_RELEASE_SAVEPOINT = "RELEASE SAVEPOINT edgepipe_insert_new"

# PostgreSQL: the sizes from which a batch's rows are worth more round trips. An upsert of
# at least STAGE_MIN_ROWS rows goes through a staging table (binary COPY, see pgcopy.py;
# 250 hourly rows cost the same either way, 650 take 2.4 ms less staged); a smaller one
# (the dead-letter counts) is one statement. `insert_new`'s `likely_new` tries its all-new
# insert (three round trips more than the upsert) from ALL_NEW_MIN_ROWS rows.
STAGE_MIN_ROWS = 250
ALL_NEW_MIN_ROWS = 100
# `_count_present` on PostgreSQL reads the stored keys of a batch's span when it holds at most
# this many rows per key of the batch (other workers' events of the same minutes, say).
SPAN_ROWS_PER_KEY = 4


class Bulk(PgCopy):
    """insert_new, delete_keys and upsert_add(_rows), on the statement cache."""

    def insert_new(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        key: Sequence[str],
        likely_present: bool = False,
        likely_new: bool = False,
    ) -> list[int]:
        """Insert rows, skipping those whose `key` (a unique index) already exists. Returns
        the positions in `rows` of the rows this call inserted. The keys within `rows`
        must be distinct. The two hints, from what the caller saw last, change how the
        work is done, never its result.

        `likely_present` (the caller has just seen a batch that was all duplicates, as when
        a backlog is delivered again) makes it first count the keys already stored, in one
        statement over a JSON array of them (`_count_present`): when all are, nothing is
        inserted and the insert is skipped; otherwise the insert runs as usual. Counting
        costs about two thirds of a conflicting insert of the same rows on SQLite (100
        keys), half on PostgreSQL (1000 keys: no sequence value and speculative insertion
        a row, a third of the JSON to send and read).

        On PostgreSQL the insert is one `INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING`
        the new keys (see `_insert_json`), in key order (see the module's docstring).
        `likely_new` (the caller's last batch was all new, as when it keeps up with fresh
        traffic) first tries to store them all at once, returning nothing, in a savepoint
        (`_insert_all_new`): a binary COPY, about half the server's time of the upsert and
        its RETURNING for 1000 new rows, with three round trips more; a stored key makes it
        roll back to the savepoint and run the upsert (from `ALL_NEW_MIN_ROWS` rows: for
        fewer, the round trips cost more than they save). SQLite ignores it. On SQLite the
        insert is a plain executemany, whose row count says whether all or none of the rows
        were new (the common cases); only a mix asks which: the write transaction holds the
        database lock (BEGIN IMMEDIATE), and the new rows of a table keyed by an integer
        rowid got consecutive rowids (each the maximum plus one; a skipped row takes none),
        the last of them `last_insert_rowid()`."""
        if not rows:
            return []
        (rowid,) = table.primary_key.columns
        shape = ("insert_new", table.name, tuple(key))
        at = [columns.index(k) for k in key]
        if likely_present and self._count_present(conn, table, key, list(map(itemgetter(*at), rows))) == len(rows):
            return []
        if self.dialect == "sqlite":
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
            if (
                likely_new and not likely_present and len(rows) >= ALL_NEW_MIN_ROWS
                and self._insert_all_new(conn, table, columns, key, rows)
            ):  # fmt: skip
                return list(range(len(rows)))
            stmt = self.cached(
                (*shape, tuple(columns)),
                lambda: (
                    self._insert_json(table, columns, key)
                    .on_conflict_do_nothing(index_elements=list(key))
                    .returning(*(table.c[k] for k in key))
                ),
            )
            got = self.fetchall(conn, stmt, ("rows",), (_json(rows),))
            if len(got) in (0, len(rows)):
                return list(range(len(got)))
            new = set(got)
        return [i for i, r in enumerate(rows) if tuple(r[j] for j in at) in new]

    def _insert_all_new(self, conn: Connection, table: sa.Table, columns: Sequence[str], key: Sequence[str],
                        rows: Sequence[Sequence[Any]]) -> bool:  # fmt: skip
        """PostgreSQL: store all the rows, in key order, inside a savepoint: by binary COPY
        (`copy_rows`), or by a plain INSERT … SELECT from JSON where COPY declines the
        values. True when it stored them all; False, having changed nothing, when a key
        was already stored (a unique violation, which rolls back to the savepoint). Any
        other error is raised. The order is Python's sort of the key tuples, which is the
        order `_key_order` gives the SQL (strings in byte order)."""
        ordered = sorted(rows, key=itemgetter(*(columns.index(k) for k in key)))
        driver: Any = conn.connection.driver_connection
        with self.driver_errors(_SAVEPOINT), driver.cursor() as cursor:
            cursor.execute(_SAVEPOINT)
            try:
                if not self.copy_rows(conn, table, columns, ordered):
                    plain = self.cached(("insert_all_new", table.name, tuple(columns), tuple(key)),
                                        lambda: self._insert_json(table, columns, key))  # fmt: skip
                    self.execute(conn, plain, ("rows",), (_json(ordered),))
            except (sa.exc.DBAPIError, self.engine.dialect.loaded_dbapi.Error) as exc:
                if getattr(getattr(exc, "orig", exc), "sqlstate", None) != UNIQUE_VIOLATION:
                    raise
                cursor.execute(_ROLLBACK_TO_SAVEPOINT)
                return False
            cursor.execute(_RELEASE_SAVEPOINT)
        return True

    def _count_present(self, conn: Connection, table: sa.Table, key: Sequence[str], keys: list[Any]) -> int:
        """How many of `keys` (a value per row for a one-column `key`, else a tuple of the
        `key` columns' values) `table` holds.

        SQLite: one join of a JSON array of the keys (`json_each`) with the table.
        PostgreSQL, whose index descents cost more: the keys stored in the span of the
        batch's first key column (`_present_in_span`) when that span holds few rows, as it
        does for a backlog delivered again in time order (one walk of the index instead of
        a descent a key: a quarter of the server's time at 1000 keys); else the join of the
        key columns' JSON arrays with the table (`_count_side_by_side`)."""
        if self.dialect == "sqlite":
            stmt = self.cached(("count_present", table.name, tuple(key)), lambda: self._count_json_each(table, key))
            return self.fetchall(conn, stmt, ("keys",), (orjson.dumps(keys).decode(),))[0][0]
        if len(key) > 1 and isinstance(table.c[key[0]].type, sa.Integer):
            present = self._present_in_span(conn, table, key, keys)
            if present is not None:
                return present
        names = [f"k{i}" for i in range(len(key))]
        per_column = [keys] if len(key) == 1 else list(zip(*keys, strict=True))
        stmt = self.cached(("count_present", table.name, tuple(key)), lambda: self._count_side_by_side(table, key))
        return self.fetchall(conn, stmt, names, [orjson.dumps(list(c)).decode() for c in per_column])[0][0]

    def _present_in_span(self, conn: Connection, table: sa.Table, key: Sequence[str], keys: list[Any]) -> int | None:
        """PostgreSQL: how many of `keys` are among the stored keys whose first column lies
        between the batch's least and greatest, read in one walk of the key's index; None
        when that span holds more than `SPAN_ROWS_PER_KEY` rows a key (the caller probes
        key by key instead)."""
        firsts = [k[0] for k in keys]
        limit = SPAN_ROWS_PER_KEY * len(keys) + 1
        stmt = self.cached(
            ("present_in_span", table.name, tuple(key)),
            lambda: (
                sa.select(*(table.c[k] for k in key))
                .where(table.c[key[0]].between(sa.bindparam("lo"), sa.bindparam("hi")))
                .order_by(table.c[key[0]])
                .limit(sa.bindparam("n"))
            ),
        )
        stored = self.fetchall(conn, stmt, ("lo", "hi", "n"), (min(firsts), max(firsts), limit))
        if len(stored) >= limit:
            return None
        return len(set(map(tuple, keys)).intersection(stored))

    @staticmethod
    def _count_json_each(table: sa.Table, key: Sequence[str]) -> Any:
        """SQLite: the count over `json_each` of one array of keys (bound as `keys`)."""
        j = sa.func.json_each(sa.bindparam("keys")).table_valued("value").alias("j")
        item = j.c.value.op("->>")
        if len(key) == 1:
            match = [table.c[key[0]] == j.c.value]
        else:
            match = [table.c[k] == item(sa.literal_column(str(i))) for i, k in enumerate(key)]
        return sa.select(sa.func.count()).select_from(j.join(table, sa.and_(*match)))

    def _count_side_by_side(self, table: sa.Table, key: Sequence[str]) -> Any:
        """PostgreSQL: the count over the key columns' JSON arrays (bound as `k0`, `k1`, …)
        zipped by `ROWS FROM`, which SQLAlchemy does not build: written out here."""
        quote, dialect = self.engine.dialect.identifier_preparer, self.engine.dialect
        arrays = ", ".join(f"jsonb_array_elements_text(CAST(:k{i} AS JSONB))" for i in range(len(key)))
        names = ", ".join(f"v{i}" for i in range(len(key)))
        values = [
            f"j.v{i}"
            if isinstance(table.c[k].type, sa.String)
            else f"CAST(j.v{i} AS {table.c[k].type.compile(dialect)})"
            for i, k in enumerate(key)
        ]  # strings stay TEXT (see `_from_json_text`)
        match = " AND ".join(f"t.{quote.quote(k)} = {v}" for k, v in zip(key, values, strict=True))
        return sa.text(
            f"SELECT count(*) FROM ROWS FROM ({arrays}) AS j({names}) JOIN {quote.format_table(table)} AS t ON {match}"
        )

    def delete_keys(self, conn: Connection, table: sa.Table, column: str, values: Sequence[Any]) -> None:
        """DELETE the rows whose `column` is one of `values` (executemany on SQLite, one
        statement on PostgreSQL). On PostgreSQL, distinct integers that make up a whole
        run lo, lo+1, …, hi (a queue batch's message numbers, taken in order) are deleted
        as the range `BETWEEN lo AND hi`, which holds no other value: one walk of the index
        instead of a descent a value (a tenth of a batch of duplicates' server time at 1000
        messages). Other values are bound as the text form of an array (`= ANY(array)`:
        psycopg would adapt a list value by value in Python, ~1 µs each)."""
        col = table.c[column]
        if self.dialect == "sqlite":
            stmt = self.cached(
                ("delete_keys", table.name, column), lambda: table.delete().where(col == sa.bindparam("k"))
            )
            self.executemany(conn, stmt, ("k",), [(v,) for v in values])
        elif values and (run := _int_run(values)) is not None:
            stmt = self.cached(
                ("delete_run", table.name, column),
                lambda: table.delete().where(col.between(sa.bindparam("lo"), sa.bindparam("hi"))),
            )
            self.execute(conn, stmt, ("lo", "hi"), run)
        else:
            stmt = self.cached(
                ("delete_keys", table.name, column),
                lambda: table.delete().where(
                    col == sa.any_(sa.cast(sa.bindparam("k", type_=sa.Text), _pg().ARRAY(col.type)))
                ),
            )
            self.execute(conn, stmt, ("k",), (_pg_array(values),))

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
        """`upsert_add` for row tuples in `columns` order; a key may appear only once.

        On PostgreSQL the rows are upserted in key order (see the module's docstring), read
        by one `INSERT … SELECT … ON CONFLICT DO UPDATE` from a staging table filled by
        binary COPY (`STAGE_MIN_ROWS` rows or more; see pgcopy.py), else from a JSONB
        array (`_insert_json`)."""
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
        shape = (table.name, columns, tuple(keys), tuple(minimum), tuple(maximum))
        stage = self.staged(conn, table, columns, rows) if len(rows) >= STAGE_MIN_ROWS else None
        if stage is not None:
            stmt = self.cached(
                ("upsert_add_staged", *shape),
                lambda: self._additive(
                    self.insert(table).from_select(
                        list(columns),
                        sa.select(*(stage.c[c] for c in columns)).order_by(*_key_order(table, keys, stage.c)),
                    ),
                    table, columns, keys, minimum, maximum,
                ),
            )  # fmt: skip
            self.execute(conn, stmt)
            return
        stmt = self.cached(
            ("upsert_add_json", *shape),
            lambda: self._additive(self._insert_json(table, columns, keys), table, columns, keys, minimum, maximum),
        )
        self.execute(conn, stmt, ("rows",), (_json(rows),))

    def _insert_json(self, table: sa.Table, columns: Sequence[str], key: Sequence[str]) -> Any:
        """PostgreSQL: INSERT … SELECT from one JSONB array of rows (bound as `rows`, see
        `_json`), each row an array of values in `columns` order, cast to the columns'
        types by the server, and sorted by `key` (the lock order: see the module's
        docstring). Many rows, one statement and one parameter: an executemany costs a
        round trip per row, and array parameters are adapted value by value in Python."""
        rows = sa.bindparam("rows", type_=sa.Text).cast(_pg().JSONB)
        r = sa.func.jsonb_array_elements(rows).table_valued("value").alias("r")
        value = r.c.value.op("->>")
        values = {c: _from_json_text(value(sa.literal_column(str(i))), table.c[c]) for i, c in enumerate(columns)}
        select = sa.select(*values.values()).select_from(r).order_by(*_key_order(table, key, values))
        return self.insert(table).from_select(list(columns), select)


def _key_order(table: sa.Table, key: Sequence[str], values: Any) -> list[Any]:
    """`ORDER BY` terms putting rows in key order: `values[k]` for each `key` column, a
    string in byte order (`COLLATE "C"`: the order Python sorts strings in, whatever the
    database's collation)."""
    return [sa.collate(values[k], "C") if isinstance(table.c[k].type, sa.String) else values[k] for k in key]


def _from_json_text(text: Any, column: sa.Column[Any]) -> Any:
    """PostgreSQL: a value read from JSON as text, as `column`'s type; a string stays TEXT,
    since an explicit cast to VARCHAR(n) would cut a longer one short where writing it to
    the column refuses it (SQLSTATE 22001), and a comparison with it must not match a
    stored string it begins with."""
    return text if isinstance(column.type, sa.String) else sa.cast(text, column.type)


def _json(rows: Sequence[Sequence[Any]]) -> str:
    """Rows as the JSON text `_insert_json` binds."""
    return orjson.dumps(rows).decode()


def _int_run(values: Sequence[Any]) -> tuple[int, int] | None:
    """(lo, hi) when `values` are the distinct integers lo, lo+1, …, hi in any order."""
    if set(map(type, values)) != {int}:
        return None
    lo, hi = min(values), max(values)
    return (lo, hi) if hi - lo + 1 == len(values) == len(set(values)) else None


def _pg_array(values: Sequence[Any]) -> str:
    """The text form of a PostgreSQL array of `values` (integers written as they are,
    anything else quoted and escaped)."""
    if set(map(type, values)) == {int}:
        return "{" + ",".join(map(str, values)) + "}"
    return "{" + ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _pg() -> Any:
    """SQLAlchemy's PostgreSQL dialect module, imported only by a PostgreSQL database (a
    SQLite command then starts ~25 ms sooner)."""
    from sqlalchemy.dialects import postgresql

    return postgresql
