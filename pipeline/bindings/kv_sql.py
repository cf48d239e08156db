"""The embedded KV backend: the `kv_entries` table in the DB binding's database.

Keys are stored as their UTF-8 bytes (a BLOB / BYTEA primary key), so both SQLite and
PostgreSQL order them bytewise whatever the database collation, and a prefix scan is a
primary-key range. A `put` is one upsert, atomic for readers on both dialects.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.bindings.kv import KV, Entry, prefix_end
from pipeline.schema import kv_entries


def _alive(now: Any) -> sa.ColumnElement[bool]:
    return sa.or_(kv_entries.c.expiration.is_(None), kv_entries.c.expiration > now)


class SqlKV(KV):
    def __init__(self, db: Database) -> None:
        self.db = db

    # `get` and `put` run cached statements (built once per database): a snapshot refresh
    # writes two keys while the consumer waits for the write lock.

    def _read(self, key: bytes) -> Entry | None:
        def build() -> sa.Select[tuple[bytes, str | None, float | None]]:
            k, now = sa.bindparam("k", type_=kv_entries.c.key.type), sa.bindparam("now", type_=sa.Float)
            return sa.select(kv_entries.c.value, kv_entries.c.metadata, kv_entries.c.expiration).where(
                kv_entries.c.key == k, _alive(now)
            )

        with self.db.read() as conn:
            rows = self.db.fetchall(conn, self.db.cached(("kv_get",), build), ("k", "now"), (key, clock.now_s()))
        return Entry(bytes(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def _write(self, key: bytes, value: bytes, metadata: str | None, expiration: float | None) -> None:
        def build() -> sa.Insert:
            stmt = self.db.insert(kv_entries)
            return stmt.on_conflict_do_update(
                index_elements=["key"],
                set_={
                    "value": stmt.excluded.value,
                    "metadata": stmt.excluded.metadata,
                    "expiration": stmt.excluded.expiration,
                },
            )

        columns = ("key", "value", "metadata", "expiration")
        with self.db.transaction() as conn:
            self.db.execute(conn, self.db.cached(("kv_put",), build), columns, (key, value, metadata, expiration))

    def _delete(self, key: bytes) -> None:
        with self.db.transaction() as conn:
            conn.execute(kv_entries.delete().where(kv_entries.c.key == key))

    def _scan(self, prefix: bytes, after: bytes | None, limit: int) -> list[tuple[bytes, Entry]]:
        stmt = sa.select(kv_entries.c.key, kv_entries.c.metadata, kv_entries.c.expiration).where(_alive(clock.now_s()))
        if prefix:
            stmt = stmt.where(kv_entries.c.key >= prefix)
            end = prefix_end(prefix)
            if end is not None:
                stmt = stmt.where(kv_entries.c.key < end)
        if after is not None:
            stmt = stmt.where(kv_entries.c.key > after)
        stmt = stmt.order_by(kv_entries.c.key).limit(limit)
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        return [(bytes(r.key), Entry(b"", r.metadata, r.expiration)) for r in rows]

    def purge_expired(self) -> int:
        with self.db.transaction() as conn:
            result = conn.execute(kv_entries.delete().where(kv_entries.c.expiration <= clock.now_s()))
        return result.rowcount or 0
