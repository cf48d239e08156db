"""Replay: list, verify, export, restore and rebuild, working from the bucket alone.

Objects are found by listing `<prefix>/dt=YYYY-MM-DD/` for each day of the range and are
trusted only through their own metadata (sha256, row count), so none of this needs the
`archive_objects` table. Every object is decoded and checked in full before any of its
rows is used; a truncated or corrupt object is reported by name in `bad` and skipped,
the others are still processed, and callers exit non-zero when `bad` is not empty.

Retention takes two things out of a range, and replay says so rather than failing on
them: the objects of hours older than `[retention] archive_days`, deleted by the `expire`
job (`expired_hours`, read from `archive_objects`: the bucket no longer knows them), and
the hourly rows of days older than `[retention] hourly_days`, pruned into daily rows by
the `rollup` job (`verify` compares those days with their daily rows; `rebuild` refuses to
bring their hourly rows back).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import IO, Any

import msgspec
import orjson
import sqlalchemy as sa

from archiver.objects import ROW_DECODER, ROW_FIELDS, key_hour, read_objects
from pipeline import clock, meta
from pipeline.aggregate import AGG_COLUMNS, AGG_KEYS, Acc, fold
from pipeline.bindings.archive import ObjectStore
from pipeline.bindings.db import Database
from pipeline.errors import IntegrityError, ValidationError
from pipeline.schema import (
    OTHER_PATH,
    ArchiveState,
    ObjectStatus,
    archive_objects,
    path_stats_hourly,
    traffic_events,
)

HOUR_S = 3600
DAY_S = 86_400
FETCH = 5000
MAX_DAY_LISTINGS = 31
Progress = Callable[[int, int], None]  # (objects read, objects in all)
# A hot row as `fold` takes it: (ts, host, aggregated path, method, status, bytes, ms).
_event = traffic_events.c
HOT_FOLD_COLUMNS = (
    _event.ts, _event.host, sa.case((_event.overflow != 0, OTHER_PATH), else_=_event.path), _event.method,
    _event.status, _event.bytes, _event.response_time_ms,
)  # fmt: skip


def hour_range(start_s: float, end_s: float) -> tuple[int, int]:
    """Whole hours [first, last) covering [start_s, end_s)."""
    if end_s <= start_s:
        raise ValidationError("--to", "must be after --from")
    return int(start_s) // HOUR_S * HOUR_S, -(-int(end_s) // HOUR_S) * HOUR_S


def expired_hours(db: Database, start_s: float, end_s: float) -> list[int]:
    """The hours (epoch s) of [start, end) whose objects the `expire` job deleted from the
    bucket (`[retention] archive_days`): replay finds nothing of them there any more."""
    h0, h1 = hour_range(start_s, end_s)
    hour = archive_objects.c.hour
    stmt = sa.select(hour).where(archive_objects.c.status == ObjectStatus.EXPIRED, hour >= h0, hour < h1)
    with db.read() as conn:
        return [int(h) for h in conn.execute(stmt.group_by(hour).order_by(hour)).scalars()]


def objects_in(store: ObjectStore, prefix: str, start_s: float, end_s: float) -> list[tuple[str, int, int]]:
    """(key, hour, size) of the objects whose event hour is in [start, end), key order."""
    h0, h1 = hour_range(start_s, end_s)
    day = datetime.fromtimestamp(h0, UTC).date()
    last_day = datetime.fromtimestamp(h1 - 1, UTC).date()
    if (last_day - day).days > MAX_DAY_LISTINGS:  # a long range: one listing of the whole prefix
        prefixes = [f"{prefix}/"]
    else:
        prefixes = [f"{prefix}/dt={day + timedelta(days=d):%Y-%m-%d}/" for d in range((last_day - day).days + 1)]
    found = []
    for p in prefixes:
        for info in store.list(p):
            hour = key_hour(info.key)
            if hour is not None and h0 <= hour < h1:
                found.append((info.key, hour, info.size))
    return found


def list_objects(store: ObjectStore, prefix: str, start_s: float, end_s: float) -> list[dict[str, Any]]:
    out = []
    for key, hour, size in objects_in(store, prefix, start_s, end_s):
        rows = store.head(key).metadata.get("rows")
        out.append({"key": key, "hour": hour, "rows": int(rows) if rows else None, "bytes": size})
    return out


def reading(
    store: ObjectStore, keys: list[str], decoder: msgspec.json.Decoder[Any], progress: Progress | None
) -> Generator[tuple[str, list[Any] | IntegrityError], None, None]:
    """`read_objects`, calling `progress(objects read, objects in all)` after each."""
    with closing(read_objects(store, keys, decoder)) as found:
        for done, item in enumerate(found, 1):
            if progress is not None:
                progress(done, len(keys))
            yield item


def iter_objects(
    store: ObjectStore, prefix: str, start_s: float, end_s: float, bad: list[dict[str, str]],
    decoder: msgspec.json.Decoder[Any] = ROW_DECODER, progress: Progress | None = None,
) -> Iterator[tuple[str, list[Any]]]:  # fmt: skip
    """(key, rows) of each sound object in range; bad ones are appended to `bad`."""
    keys = [k for k, _h, _s in objects_in(store, prefix, start_s, end_s)]
    for key, rows in reading(store, keys, decoder, progress):
        if isinstance(rows, IntegrityError):
            bad.append({"key": key, "error": str(rows)})
        else:
            yield key, rows


class FoldRow(msgspec.Struct, gc=False):
    """The fields of an archived row that its aggregate needs (the others are skipped).
    Untracked by the garbage collector (it holds no containers), which would otherwise
    walk every row of an object over and over while they are decoded and folded."""

    ts: int
    host: str
    path: str
    method: str
    status: int
    bytes: int | None
    response_time_ms: float
    overflow: int


FOLD_DECODER = msgspec.json.Decoder(FoldRow)
_FOLD_FIELDS = attrgetter("ts", "host", "path", "method", "status", "bytes", "response_time_ms")


def aggregate_rows(rows: list[FoldRow], acc: Acc) -> None:
    """Aggregate archived rows exactly like the consumer did (overflow → __other__; the
    path of such a row is rewritten in place)."""
    for r in rows:
        if r.overflow:
            r.path = OTHER_PATH
    fold(acc, map(_FOLD_FIELDS, rows))


def fold_archive(
    store: ObjectStore, prefix: str, start_s: float, end_s: float, acc: Acc, bad: list[dict[str, str]],
    progress: Progress | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Aggregate every sound object of the range into `acc`: (objects, rows)."""
    objects = rows = 0
    for _key, obj_rows in iter_objects(store, prefix, start_s, end_s, bad, FOLD_DECODER, progress):
        aggregate_rows(obj_rows, acc)
        objects += 1
        rows += len(obj_rows)
    return objects, rows


def export(
    store: ObjectStore, prefix: str, start_s: float, end_s: float, out: IO[str], fmt: str = "ndjson",
    path: str | None = None, progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Stream the archived rows with `start <= ts < end` (and `path`, if given) to `out`."""
    if fmt not in ("ndjson", "csv"):
        raise ValidationError("--format", f"must be ndjson or csv, got {fmt!r}")
    lo, hi = int(start_s * 1000), int(end_s * 1000)
    bad: list[dict[str, str]] = []
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(ROW_FIELDS)
    n = objects = 0
    for _key, rows in iter_objects(store, prefix, start_s, end_s, bad, progress=progress):
        objects += 1
        buf = io.StringIO()
        for r in rows:
            if not lo <= r["ts"] < hi or (path is not None and r["path"] != path):
                continue
            n += 1
            if writer is not None:
                writer.writerow([r.get(f) for f in ROW_FIELDS])
            else:
                buf.write(orjson.dumps(r).decode())
                buf.write("\n")
        out.write(buf.getvalue())
    return {"ok": not bad, "objects": objects, "rows": n, "bad": bad}


def restore(
    db: Database, store: ObjectStore, prefix: str, start_s: float, end_s: float, progress: Progress | None = None
) -> dict[str, Any]:
    """Put archived rows with `start <= ts < end` back into `traffic_events` in
    archive_state 2: idempotent (ON CONFLICT (ts, id) DO NOTHING), never aggregated, never
    counted as hot nor archived again (they are already counted in cold). Expired hours
    have nothing left to restore: `expired_hours` names them."""
    lo, hi = int(start_s * 1000), int(end_s * 1000)
    bad: list[dict[str, str]] = []
    inserted = seen = objects = 0
    stmt = db.insert(traffic_events).on_conflict_do_nothing(index_elements=["ts", "id"]).returning(traffic_events.c.seq)
    for _key, rows in iter_objects(store, prefix, start_s, end_s, bad, progress=progress):
        objects += 1
        values = [
            {f: r[f] for f in ROW_FIELDS if f != "seq"} | {"archive_state": ArchiveState.RESTORED}
            for r in rows
            if lo <= r["ts"] < hi
        ]
        seen += len(values)
        for i in range(0, len(values), FETCH):
            with db.transaction() as conn:
                inserted += len(conn.execute(stmt, values[i : i + FETCH]).all())
    result = {"ok": not bad, "objects": objects, "rows": seen, "inserted": inserted, "bad": bad}
    return result | {"expired_hours": expired_hours(db, start_s, end_s)}


def drop_restored(db: Database, start_s: float, end_s: float, batch: int = FETCH) -> dict[str, Any]:
    """Delete the rows `restore` put back (archive_state 2) with `start <= ts < end`, in
    transactions of at most `batch` rows. They are in the bucket and counted in cold, never
    in hot nor in the aggregates, so no total changes; hot and archived rows are untouched."""
    hour_range(start_s, end_s)  # the range is checked as every replay command checks it
    lo, hi = int(start_s * 1000), int(end_s * 1000)
    doomed = (
        sa.select(traffic_events.c.seq)
        .where(
            traffic_events.c.ts >= lo, traffic_events.c.ts < hi, traffic_events.c.archive_state == ArchiveState.RESTORED
        )
        .limit(batch)
        .scalar_subquery()
    )
    deleted = 0
    while True:
        with db.transaction() as conn:
            n = conn.execute(sa.delete(traffic_events).where(traffic_events.c.seq.in_(doomed))).rowcount
        deleted += n
        if n < batch:
            return {"ok": True, "deleted": deleted}


def rebuild(
    store: ObjectStore, prefix: str, start_s: float, end_s: float, into: Database, progress: Progress | None = None
) -> dict[str, Any]:
    """Rebuild the hourly aggregates of [start, end) into a fresh database from the archive
    alone (disaster recovery). Refuses a target that already has aggregates there. Never
    brings back the hourly rows of days the target pruned into daily rows (`[retention]
    hourly_days`; they would count twice): those hours are skipped, and `note` says so."""
    h0, h1 = hour_range(start_s, end_s)
    with into.read() as conn:
        pruned = meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE)
    skipped: dict[str, Any] = {}
    if pruned > h0:
        upto = min(pruned, h1)
        skipped = {"pruned_hours_skipped": (upto - h0) // HOUR_S, "note": (
            f"hours before {clock.iso(upto)} not rebuilt: the target pruned the hourly rows of those days "
            "into daily rows ([retention] hourly_days)")}  # fmt: skip
        if pruned >= h1:
            return {"ok": True, "objects": 0, "rows": 0, "hourly_rows": 0, "bad": []} | skipped
        start_s = h0 = pruned
    with into.read() as conn:
        present = conn.execute(
            sa.select(sa.func.count()).where(path_stats_hourly.c.hour >= h0, path_stats_hourly.c.hour < h1)
        ).scalar_one()
    if present:
        raise ValidationError(
            "--into", f"target already holds {present} hourly rows in that range; use a fresh database"
        )
    bad: list[dict[str, str]] = []
    acc: Acc = {}
    objects, rows = fold_archive(store, prefix, start_s, end_s, acc, bad, progress)
    values = [dict(zip(AGG_KEYS, key, strict=True)) | dict(zip(AGG_COLUMNS, a, strict=True)) for key, a in acc.items()]
    with into.transaction() as conn:
        for i in range(0, len(values), FETCH):
            into.upsert_add(conn, path_stats_hourly, values[i : i + FETCH], AGG_KEYS, ["rt_min_ms"], ["rt_max_ms"])
    return {"ok": not bad, "objects": objects, "rows": rows, "hourly_rows": len(values), "bad": bad} | skipped


__all__ = ["drop_restored", "expired_hours", "export", "list_objects", "rebuild", "restore"]
