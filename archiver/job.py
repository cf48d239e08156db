"""The archive job (02:00): detail rows older than the retention window go to the bucket.

Cutoff = scheduled time − `[retention] detail_days`. A row is selected by *state*, not by
a seq high-water mark: every row with `ts < cutoff` still in `archive_state` 0 is archived,
so late rows for an already-archived hour and rows committed out of seq order by
concurrent PostgreSQL writers are picked up by the next run, in a new object of their own.

Per object (rows of one hour, at most `max_rows_per_object`: an hour with more is cut into
objects of consecutive seqs; an hour that fits in one is read as the ts index finds it):
1. stream the rows through gzip into a spooled temp file, hashing the compressed bytes;
2. record it as `pending` in `archive_objects` (so a crash after the upload is visible);
3. upload, then re-read (`verify = "full"`: size + sha256 of the body; `"head"`: size +
   the stored checksum);
4. in one transaction, mark exactly those rows `archive_state = 1` (the count must match)
   and mark the object `verified`.
A run first deletes the objects of leftover `pending` records (a crash between upload and
step 4), so the bucket never holds the same event twice; the re-run writes the same key.

Before selecting anything, the run raises the archive watermark to the cutoff: from then
on the consumer refuses older events as `too_late`, because once their hour is cleaned a
duplicate could no longer be detected.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from archiver.objects import ROW_FIELDS, check_stored, encode, manifest_key, object_key
from pipeline import clock, meta
from pipeline.errors import IntegrityError
from pipeline.jobs import job
from pipeline.schema import archive_objects, traffic_events

log = logging.getLogger("edgepipe.archiver")
te = traffic_events
ao = archive_objects
HOUR_MS = 3_600_000
SELECT_COLUMNS = [te.c[c] for c in ROW_FIELDS]
FETCH = 5000


def cutoff_ms(env: Any, scheduled_for: datetime) -> int:
    return int((scheduled_for - timedelta(days=env.config.retention.detail_days)).timestamp() * 1000)


def _in_hour(hour_s: int) -> Any:
    return sa.and_(te.c.ts >= hour_s * 1000, te.c.ts < hour_s * 1000 + HOUR_MS)


def _next_rows(whole_hour: bool) -> sa.Select[Any]:
    """The rows of the next object (see `archive_next`); binds `lo`, `hi`, `cutoff`, `after`
    and, unless `whole_hour`, `limit`."""
    stmt = sa.select(*SELECT_COLUMNS).where(
        te.c.ts >= sa.bindparam("lo"), te.c.ts < sa.bindparam("hi"), te.c.ts < sa.bindparam("cutoff"),
        te.c.archive_state == 0, te.c.seq > sa.bindparam("after"),
    )  # fmt: skip
    if not whole_hour:  # sort the hour's rows found by the ts index, never walk the whole table by seq
        stmt = stmt.order_by(te.c.seq + 0).limit(sa.bindparam("limit", type_=sa.Integer))
    return stmt


def hour_counts(conn: sa.Connection, cutoff: int) -> list[tuple[int, int]]:
    """(event hour in epoch s, rows) of the unarchived rows older than the cutoff."""
    hour = te.c.ts // HOUR_MS
    stmt = sa.select(hour, sa.func.count()).where(te.c.ts < cutoff, te.c.archive_state == 0).group_by(hour)
    return [(int(h) * 3600, int(n)) for h, n in conn.execute(stmt.order_by(hour))]


def _object_rows(hour_s: int, cutoff: int, first: int, last: int, state: int = 0) -> Any:
    return sa.and_(_in_hour(hour_s), te.c.ts < cutoff, te.c.seq.between(first, last), te.c.archive_state == state)


def recover_pending(env: Any) -> int:
    """Delete the objects (and records) of uploads a crashed run never recorded."""
    with env.DB.read() as conn:
        keys = list(conn.execute(sa.select(ao.c.key).where(ao.c.status == "pending")).scalars())
    for key in keys:
        env.ARCHIVE.delete(key)
        with env.DB.transaction() as conn:
            conn.execute(sa.delete(ao).where(ao.c.key == key, ao.c.status == "pending"))
        log.warning("archive_recovered key=%s", key)
    return len(keys)


def _free_key(conn: sa.Connection, prefix: str, hour_s: int, first: int, last: int) -> str:
    """The deterministic key, suffixed only if an older recorded object already took it
    (possible when SQLite reuses the seqs of deleted rows)."""
    retry = 0
    while True:
        key = object_key(prefix, hour_s, first, last, retry)
        if conn.execute(sa.select(ao.c.key).where(ao.c.key == key)).first() is None:
            return key
        retry += 1


def archive_next(env: Any, hour_s: int, cutoff: int, after_seq: int, whole_hour: bool) -> dict[str, Any] | None:
    """Archive the next object of one hour: its first `max_rows_per_object` unarchived
    rows with seq > `after_seq`, in seq order; or, `whole_hour`, when they all fit in one
    object, all of them in the order the ts index finds them (no sort). None when the
    hour has nothing left."""
    db, store, cfg = env.DB, env.ARCHIVE, env.config.archive
    stmt = db.cached(("archive_next", whole_hour), lambda: _next_rows(whole_hour))
    names = ("lo", "hi", "cutoff", "after") if whole_hour else ("lo", "hi", "cutoff", "after", "limit")
    values = (hour_s * 1000, hour_s * 1000 + HOUR_MS, cutoff, after_seq, cfg.max_rows_per_object)
    with db.read() as conn:  # on the driver cursor: plain tuples, no result processing
        enc = encode(db.stream_chunks(conn, stmt, names, values[: len(names)], FETCH))
    with enc.body:
        if enc.rows == 0:
            return None
        with db.transaction() as conn:
            key = _free_key(conn, cfg.prefix, hour_s, enc.min_seq, enc.max_seq)  # type: ignore[arg-type]
            conn.execute(
                sa.insert(ao).values(
                    key=key, hour=hour_s, status="pending", row_count=enc.rows, min_seq=enc.min_seq,
                    max_seq=enc.max_seq, created_at=clock.now_s(),
                )
            )  # fmt: skip
        try:
            store.put(key, enc.body, enc.metadata())
            problem = check_stored(store, key, enc.size, enc.sha256, cfg.verify)
            if problem:
                raise IntegrityError(f"{key}: read-back check failed: {problem}")
            _mark(env, key, hour_s, cutoff, enc)
        except BaseException:
            _abandon(env, key)
            raise
    return {"key": key, "rows": enc.rows, "bytes": enc.size, "raw_bytes": enc.raw_bytes, "last_seq": enc.max_seq}


def _mark(env: Any, key: str, hour_s: int, cutoff: int, enc: Any) -> None:
    """Mark the object's rows archived and the object verified, in one transaction."""
    with env.DB.transaction() as conn:
        marked = conn.execute(
            sa.update(te).where(_object_rows(hour_s, cutoff, enc.min_seq, enc.max_seq)).values(archive_state=1)
        ).rowcount
        if marked != enc.rows:
            raise IntegrityError(f"{key}: {marked} rows to mark, object holds {enc.rows}")
        conn.execute(
            sa.update(ao)
            .where(ao.c.key == key)
            .values(
                status="verified", size_bytes=enc.size, sha256=enc.sha256, min_ts=enc.min_ts, max_ts=enc.max_ts,
                verified_at=clock.now_s(),
            )
        )  # fmt: skip


def _abandon(env: Any, key: str) -> None:
    """Best effort after a failure: remove the object and its pending record. If this
    fails too, the pending record stays and the next run's recovery does it."""
    try:
        env.ARCHIVE.delete(key)
        with env.DB.transaction() as conn:
            conn.execute(sa.delete(ao).where(ao.c.key == key, ao.c.status == "pending"))
    except Exception as exc:
        log.warning("archive_abandon_failed key=%s error=%s", key, exc)


def raise_watermark(env: Any, cutoff: int) -> int:
    with env.DB.transaction() as conn:
        current = meta.archive_watermark_ms(env.DB, conn)
        if cutoff > current:
            meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(cutoff))
            return cutoff
        return current


MANIFEST_FIELDS = ("key", "hour", "status", "row_count", "size_bytes", "sha256", "min_ts", "max_ts", "min_seq",
                   "max_seq")  # fmt: skip


def write_manifests(env: Any, hours: set[int]) -> int:
    """Rewrite the manifest of each day holding one of `hours`: every object of the day
    recorded in `archive_objects` (all but pending uploads), with its status and metadata,
    key order, and the day's totals. Returns the number written."""
    days = sorted({hour - hour % 86_400 for hour in hours})
    for day in days:
        with env.DB.read() as conn:
            rows = conn.execute(
                sa.select(*(ao.c[f] for f in MANIFEST_FIELDS))
                .where(ao.c.hour >= day, ao.c.hour < day + 86_400, ao.c.status != "pending")
                .order_by(ao.c.key)
            ).all()
        entries = [dict(zip(MANIFEST_FIELDS, r, strict=True)) for r in rows]
        name = clock.iso(day)[:10]
        totals = {"objects": len(entries), "rows": sum(e["row_count"] for e in entries)}
        totals["bytes"] = sum(e["size_bytes"] for e in entries)
        doc = {"format": "edgepipe-manifest/1", "day": name, "generated_at": clock.iso(clock.now_s()), **totals}
        env.ARCHIVE.put_bytes(
            manifest_key(env.config.archive.prefix, name),
            orjson.dumps(doc | {"entries": entries}, option=orjson.OPT_INDENT_2),
            {k: str(v) for k, v in totals.items()},
        )
    return len(days)


@job("archive")
def run(env: Any, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    cutoff = cutoff_ms(env, scheduled_for)
    result: dict[str, Any] = {"cutoff": clock.iso(cutoff / 1000), "dry_run": dry_run, "objects": 0, "rows": 0}
    result |= {"bytes": 0, "raw_bytes": 0, "recovered": 0, "complete": True, "manifests": 0}
    if not dry_run:
        result["recovered"] = recover_pending(env)
        result["watermark"] = clock.iso(raise_watermark(env, cutoff) / 1000)
    with env.DB.read() as conn:
        hours = hour_counts(conn, cutoff)
    touched: set[int] = set()
    try:
        _archive_hours(env, hours, cutoff, dry_run, result, touched)
    finally:  # the days of the objects written, even if a later one failed
        if touched:
            try:
                result["manifests"] = write_manifests(env, touched)
            except Exception as exc:  # the objects and their records are what counts
                log.warning("archive_manifest_failed error=%s", exc)
                result["manifest_error"] = f"{type(exc).__name__}: {exc}"
    log.info("archive_run %s", " ".join(f"{k}={v}" for k, v in result.items()))
    return result


def _archive_hours(
    env: Any, hours: list[tuple[int, int]], cutoff: int, dry_run: bool, result: dict[str, Any], touched: set[int]
) -> None:
    cfg = env.config.archive
    for hour_s, count in hours:
        if dry_run:
            planned = -(-count // cfg.max_rows_per_object)
            result["objects"] += planned
            result["rows"] += count
            continue
        after = -1
        while True:
            if result["objects"] >= cfg.max_objects_per_run:
                result["complete"] = False
                break
            done = archive_next(env, hour_s, cutoff, after, count <= cfg.max_rows_per_object)
            if done is None:
                break
            after = done["last_seq"]
            touched.add(hour_s)
            result["objects"] += 1
            for k in ("rows", "bytes", "raw_bytes"):
                result[k] += done[k]
        if not result["complete"]:
            break
