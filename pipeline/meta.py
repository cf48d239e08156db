"""Small durable facts: durable counters (`counters`), and in `edgepipe_meta` the
deployment start, the archive watermark (epoch ms below which detail rows may already have left the database, so the
consumer can no longer deduplicate against them and refuses such events as `too_late`), and durable sets of marks:
one key per member under a prefix (e.g. `archive_manifest_due:2026-11-18`, a day whose manifest is due)."""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.schema import counters, meta

DEPLOYMENT_START = "deployment_started_at"
ARCHIVE_WATERMARK_MS = "archive_watermark_ms"
MANIFEST_DUE = "archive_manifest_due:"  # + YYYY-MM-DD: the day's manifest is to be (re)written


_GET = sa.select(meta.c.value).where(meta.c.key == sa.bindparam("key"))


def get(conn: sa.Connection, key: str) -> str | None:
    return conn.execute(_GET, {"key": key}).scalar_one_or_none()


def put(db: Database, conn: sa.Connection, key: str, value: str) -> None:
    stmt = db.insert(meta).values(key=key, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}))


def mark(db: Database, conn: sa.Connection, prefix: str, member: str) -> None:
    """Add `member` to the durable set `prefix`, in the caller's transaction. Its value is
    a fresh token on every mark, so `unmark` can tell a mark made since it was read."""
    put(db, conn, prefix + member, secrets.token_hex(8))


def marks(conn: sa.Connection, prefix: str) -> dict[str, str]:
    """The members of the durable set `prefix`, each with its token."""
    rows = conn.execute(sa.select(meta.c.key, meta.c.value).where(meta.c.key.startswith(prefix, autoescape=True)))
    return {key[len(prefix) :]: token for key, token in rows}


def unmark(conn: sa.Connection, prefix: str, member: str, token: str) -> bool:
    """Remove `member` from the set unless it was marked again since `token` was read."""
    stmt = sa.delete(meta).where(meta.c.key == prefix + member, meta.c.value == token)
    return bool(conn.execute(stmt).rowcount)


def archive_watermark_ms(db: Database, conn: sa.Connection) -> int:
    """Read on every consumer batch: through the DB binding's fast path."""
    rows = db.fetchall(conn, _GET, ("key",), (ARCHIVE_WATERMARK_MS,))
    return int(rows[0][0]) if rows else 0


def ensure_deployment_start(db: Database) -> str:
    """Record the deployment start once (at first init); return it."""
    with db.transaction() as conn:
        conn.execute(
            db.insert(meta)
            .values(key=DEPLOYMENT_START, value=clock.iso(clock.now_s()))
            .on_conflict_do_nothing(index_elements=["key"])
        )
        return get(conn, DEPLOYMENT_START) or ""


def increment(db: Database, conn: sa.Connection, name: str) -> int:
    """+1 on the durable counter `name` (created at 1) in the caller's transaction; returns
    the new value. One upsert with RETURNING on the DB binding's fast path (the worker
    advances its batch counter on every batch)."""

    def build() -> Any:
        stmt = db.insert(counters).values(name=sa.bindparam("name"), value=1)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={"value": counters.c.value + 1})
        return stmt.returning(counters.c.value)

    return int(db.fetchall(conn, db.cached(("increment",), build), ("name",), (name,))[0][0])
