"""Maintenance the DB binding answers for its dialect, so that no worker branches on it:
sizes of the database and of its tables (the monitor), returning free pages to the file
system (the cleaner) and planner hints for small reads of big tables (top paths)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.bindings.db.bulk import Bulk


class Maintenance(Bulk):
    _writers: AbstractContextManager[Any]  # this process's writer lock (database.py)

    def sizes(self, tables: Sequence[str]) -> tuple[int, dict[str, int] | None]:
        """(bytes of the whole database, bytes per table or None when unknown). SQLite: the
        file's pages, per table from `dbstat` when the library has it. PostgreSQL:
        `pg_total_relation_size` of `tables` (the server may hold other schemas)."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                return self._sqlite_sizes(conn)
            sizes = {}
            for name in tables:
                size = conn.execute(sa.text("SELECT pg_total_relation_size(to_regclass(:t))"), {"t": name}).scalar()
                sizes[name] = int(size or 0)
            return sum(sizes.values()), sizes

    @staticmethod
    def _sqlite_sizes(conn: Connection) -> tuple[int, dict[str, int] | None]:
        page_size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
        total = int(page_size * pages)
        try:
            rows = conn.exec_driver_sql(
                "SELECT coalesce(m.tbl_name, s.name), sum(s.pgsize) FROM dbstat s "
                "LEFT JOIN sqlite_schema m ON m.name = s.name GROUP BY 1"
            ).all()
        except sa.exc.OperationalError:
            return total, None  # SQLite built without dbstat: the file total only
        return total, {name: int(size) for name, size in rows}

    def reclaim_space(self) -> str:
        """SQLite: return free pages to the file system (incremental vacuum); the first time
        the file is switched to auto_vacuum=INCREMENTAL, which takes one full VACUUM. Runs
        holding this process's writer lock. PostgreSQL: nothing (autovacuum's job)."""
        if self.dialect != "sqlite":
            return "skipped (not sqlite)"
        with self._writers:
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                if cur.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                    cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    cur.execute("VACUUM")
                    return "vacuum (switched to incremental)"
                cur.execute("PRAGMA incremental_vacuum").fetchall()
                cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                return "incremental_vacuum"
            finally:
                raw.close()

    def plan_as_small(self, conn: Connection) -> None:
        """Hint that the next statements of this read are small reads of a big table.
        PostgreSQL: no JIT for this transaction (the planner's cost grows with the table,
        not the window, and past jit_above_cost it JIT-compiles a small query, doubling its
        time). SQLite: nothing."""
        if self.dialect == "postgresql":
            conn.exec_driver_sql("SET LOCAL jit = off")
