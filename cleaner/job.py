"""The clean job (03:00): move archived rows from hot to cold.

Only rows held by a `verified` object are deleted, and only after the object is checked
again in the bucket (`[archive] verify`: `full` re-hashes the body, `head` compares size
and stored checksum); an object that fails is flagged `corrupt` and its rows stay (the
next archive run takes a flagged object back: see `archiver.job.repair_flagged`).

Each batch (`[cleaner] batch_size` rows of one object, at most `max_batches` per run) is
ONE transaction that sums the rows in SQL, deletes exactly those rows (the deleted count
must equal the summed one), adds the sums to `lifetime_totals` and advances the object's
`cleaned_rows`, so hot + cold == total at every commit. Counts are checked against the
object: before its first batch the rows still held must equal `row_count - cleaned_rows`,
no batch may take the object past its `row_count`, and an object with nothing left must be
fully counted; any mismatch rolls the batch back and flags the object `mismatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from archiver.objects import check_stored
from cleaner import stats_file
from pipeline import clock
from pipeline.clock import HOUR_MS
from pipeline.env import Env
from pipeline.errors import IntegrityError
from pipeline.jobs import job
from pipeline.schema import ArchiveState, ObjectStatus, archive_objects, lifetime_totals, traffic_events
from pipeline.totals import FIELDS, SCOPE, event_sums

log = logging.getLogger("edgepipe.cleaner")


# Statements are built once and run on the driver's cursor (`Database.fetchall` /
# `execute`); an object's rows are bound as parameters, in `HELD` order.
HELD = ("ts_lo", "ts_hi", "seq_lo", "seq_hi")
_HELD = sa.and_(
    traffic_events.c.ts >= sa.bindparam("ts_lo"),
    traffic_events.c.ts < sa.bindparam("ts_hi"),
    traffic_events.c.seq.between(sa.bindparam("seq_lo"), sa.bindparam("seq_hi")),
    traffic_events.c.archive_state == ArchiveState.ARCHIVED,
)
_COUNT_HELD = sa.select(sa.func.count()).where(_HELD)
_OBJECT_COUNTS = sa.select(archive_objects.c.cleaned_rows, archive_objects.c.row_count).where(
    archive_objects.c.key == sa.bindparam("obj_key")
)
# The next `n` held rows in seq order: their `FIELDS` sums, computed in SQL, and their
# last seq; deleting the held rows up to that seq then takes exactly those rows.
_batch = (
    sa.select(traffic_events.c.seq, traffic_events.c.status, traffic_events.c.bytes, traffic_events.c.response_time_ms)
    .where(_HELD)
    .order_by(traffic_events.c.seq)
    .limit(sa.bindparam("n"))
    .subquery()
)
_SUM_BATCH = sa.select(*event_sums(_batch.c), sa.func.max(_batch.c.seq))
_DELETE_HELD = sa.delete(traffic_events).where(_HELD)
_SET_CLEANED = (
    sa.update(archive_objects)
    .where(archive_objects.c.key == sa.bindparam("obj_key"))
    .values(cleaned_rows=sa.bindparam("cleaned"))
)


def _held(obj: Any) -> tuple[int, int, int, int]:
    """Parameters selecting the rows an object holds: its hour, its seq range, state 1."""
    lo = obj.hour * 1000
    return lo, lo + HOUR_MS, obj.min_seq, obj.max_seq


def add_to_totals(db: Any, conn: sa.Connection, sums: Sequence[Any]) -> None:
    """Add `FIELDS` sums to the lifetime totals."""
    cols = ("scope", "updated_at", *FIELDS)

    def build() -> Any:
        stmt = db.insert(lifetime_totals).values({c: sa.bindparam(c) for c in cols})
        sets = {f: lifetime_totals.c[f] + stmt.excluded[f] for f in FIELDS} | {"updated_at": stmt.excluded.updated_at}
        return stmt.on_conflict_do_update(index_elements=["scope"], set_=sets)

    db.execute(conn, db.cached(("add_to_totals",), build), cols, (SCOPE, clock.now_s(), *sums))


def clean_batch(env: Env, obj: Any, batch_size: int, first: bool) -> tuple[int, bool]:
    """Delete up to `batch_size` rows of `obj` into lifetime_totals: (rows deleted, whether
    the object is now fully cleaned)."""
    db = env.DB
    held = _held(obj)
    with db.transaction() as conn:
        ((cleaned, rows),) = db.fetchall(conn, _OBJECT_COUNTS, ("obj_key",), (obj.key,))
        if first:
            ((remaining,),) = db.fetchall(conn, _COUNT_HELD, HELD, held)
            if remaining != rows - cleaned:
                raise IntegrityError(f"{obj.key}: {remaining} rows held, expected {rows - cleaned}")
        ((*sums, last),) = db.fetchall(conn, _SUM_BATCH, (*HELD, "n"), (*held, batch_size))
        n = sums[0]
        if n == 0:
            if cleaned != rows:
                raise IntegrityError(f"{obj.key}: no rows left but only {cleaned} of {rows} cleaned")
            return 0, True
        if cleaned + n > rows:
            raise IntegrityError(f"{obj.key}: batch of {n} rows, {cleaned}+{n} exceeds {rows}")
        deleted = db.execute(conn, _DELETE_HELD, HELD, (*held[:3], last))
        if deleted != n:
            raise IntegrityError(f"{obj.key}: deleted {deleted} rows, the batch summed {n}")
        add_to_totals(db, conn, sums)
        db.execute(conn, _SET_CLEANED, ("obj_key", "cleaned"), (obj.key, cleaned + n))
        done = cleaned + n == rows
        if done:
            conn.execute(
                sa.update(archive_objects)
                .where(archive_objects.c.key == obj.key)
                .values(status=ObjectStatus.CLEANED, cleaned_at=clock.now_s())
            )
    return n, done


def flag(env: Env, key: str, status: str, error: str) -> None:
    with env.DB.transaction() as conn:
        conn.execute(
            sa.update(archive_objects).where(archive_objects.c.key == key).values(status=status, error=error[:2000])
        )
    log.error("clean_refused key=%s status=%s error=%s", key, status, error)


def _clean_object(env: Env, obj: Any, budget: int, result: dict[str, Any]) -> int:
    """Clean one object within `budget` batches; return the batches used."""
    cfg = env.config
    problem = check_stored(env.require_archive(), obj.key, obj.size_bytes, obj.sha256 or "", cfg.archive.verify)
    if problem:
        flag(env, obj.key, ObjectStatus.CORRUPT, problem)
        result["refused"].append(obj.key)
        return 0
    used = 0
    while used < budget:
        try:
            n, done = clean_batch(env, obj, cfg.cleaner.batch_size, first=used == 0)
        except IntegrityError as exc:
            flag(env, obj.key, ObjectStatus.MISMATCH, str(exc))
            result["refused"].append(obj.key)
            return used
        if n:
            used += 1
            result["rows"] += n
        if done:
            break
    result["objects"] += 1 if used else 0  # objects this run cleaned rows from
    return used


@job("clean")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    cfg = env.config.cleaner
    with env.DB.read() as conn:
        objects = conn.execute(
            sa.select(archive_objects)
            .where(archive_objects.c.status == ObjectStatus.VERIFIED)
            .order_by(archive_objects.c.hour, archive_objects.c.key)
        ).all()
    result: dict[str, Any] = {"dry_run": dry_run, "objects": 0, "rows": 0, "batches": 0, "refused": []}
    if dry_run:
        result["objects"] = len(objects)
        result["rows"] = sum(o.row_count - o.cleaned_rows for o in objects)
        return result
    for obj in objects:
        if result["batches"] >= cfg.max_batches:
            break
        result["batches"] += _clean_object(env, obj, cfg.max_batches - result["batches"], result)
    if cfg.reclaim_space and result["rows"]:
        result["reclaim"] = env.DB.reclaim_space()
    stats_file.record_run(
        env.DB,
        {
            "date": clock.iso(clock.now_s()),
            "scheduled_for": clock.iso(scheduled_for.timestamp()),
            "rows_cleaned": result["rows"],
            "objects": result["objects"],
            "reason": "rows of verified archive objects"
            + (f"; refused {len(result['refused'])}" if result["refused"] else ""),
        },
    )
    stats_file.write(env.DB, env.config.cleaner.stats_file)
    log.info("clean_run objects=%d rows=%d batches=%d refused=%d", result["objects"], result["rows"],
             result["batches"], len(result["refused"]))  # fmt: skip
    return result
