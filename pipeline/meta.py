"""Small durable facts: durable counters (`counters`), and in `edgepipe_meta` the
deployment start, the archive watermark (epoch ms below which detail rows may already have left the database, so the
consumer can no longer deduplicate against them and refuses such events as `too_late`), and durable sets of marks:
one key per member under a prefix (e.g. `archive_manifest_due:2026-11-18`, a day whose manifest is due).

Retention keeps two day boundaries (epoch seconds of a 00:00 UTC) here: `rollup_through_s`, before which
every closed day was rolled up into `path_stats_daily` at least once, and `hourly_pruned_before_s`, before
which the hourly rows were pruned (`[retention] hourly_days`): the daily rows of those days hold them, and
the totals count them (`pipeline.totals`)."""

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
EXPIRED_DAY_DUE = "archive_expired_day:"  # + YYYY-MM-DD: a day that lost objects to `expire`, manifest to settle
ROLLUP_THROUGH = "rollup_through_s"  # every closed day before it was rolled up at least once
HOURLY_PRUNED_BEFORE = "hourly_pruned_before_s"  # hourly rows of the days before it were pruned into daily rows


_GET = sa.select(meta.c.value).where(meta.c.key == sa.bindparam("key"))


def get(conn: sa.Connection, key: str) -> str | None:
    return conn.execute(_GET, {"key": key}).scalar_one_or_none()


def get_int(conn: sa.Connection, key: str) -> int:
    """An integer fact (a watermark), 0 when not set."""
    value = get(conn, key)
    return int(value) if value else 0


def int_value(key: str) -> sa.ScalarSelect[Any]:
    """An integer fact as a scalar subquery (NULL when not set), for readers that must see
    it in the same statement as the rows it describes (`pipeline.totals.stats`)."""
    return sa.select(sa.cast(meta.c.value, sa.BigInteger)).where(meta.c.key == key).scalar_subquery()


def put(db: Database, conn: sa.Connection, key: str, value: str) -> None:
    stmt = db.insert(meta).values(key=key, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}))


def put_often(db: Database, conn: sa.Connection, key: str, value: str) -> None:
    """`put` for a fact written often (an ingest's checkpoint, with every send): the upsert
    is built once and run on the DB binding's fast path, in the caller's transaction."""

    def build() -> Any:
        stmt = db.insert(meta).values(key=sa.bindparam("key"), value=sa.bindparam("value"))
        return stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value})

    db.execute(conn, db.cached(("meta_put",), build), ("key", "value"), (key, value))


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
