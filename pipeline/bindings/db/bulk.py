"""Bulk writes of `Database`: insert-if-new with the positions inserted, deletes by key,
and additive upserts.

These are the consumer's and the aggregator's per-batch statements, where the dialects
differ most: SQLite takes an executemany on the driver's cursor (one prepared statement,
no round trips) and reads the rest from the write lock it holds; PostgreSQL takes a whole
batch as one statement and one parameter (a JSONB array of rows, or an array of keys),
since an executemany costs a round trip per row there.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.bindings.db.fastpath import FastPath


def _json_rows(rows: Sequence[Sequence[Any]]) -> dict[str, str]:
    return {"rows": orjson.dumps(rows).decode()}


class Bulk(FastPath):
    """insert_new, delete_keys and upsert_add(_rows), on the statement cache."""

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
                lambda: table.delete().where(col == sa.any_(sa.bindparam("k", type_=_pg().ARRAY(col.type)))),
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
        rows = sa.bindparam("rows", type_=sa.Text).cast(_pg().JSONB)
        r = sa.func.jsonb_array_elements(rows).table_valued("value").alias("r")
        value = r.c.value.op("->>")
        values = [sa.cast(value(sa.literal_column(str(i))), table.c[c].type) for i, c in enumerate(columns)]
        return self.insert(table).from_select(list(columns), sa.select(*values).select_from(r))


def _pg() -> Any:
    """SQLAlchemy's PostgreSQL dialect module, imported only by a PostgreSQL database (a
    SQLite command then starts ~25 ms sooner)."""
    from sqlalchemy.dialects import postgresql

    return postgresql
