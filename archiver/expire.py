"""The expire job (06:00): archive objects past `[retention] archive_days` leave the bucket.

Cutoff = scheduled time − `archive_days` (0, the default, keeps objects forever: the run
does nothing and says so). An object expires when every event it holds is older than the
cutoff (its hour ends at or before it) and its rows have left the database (status
`cleaned`): their counts are in lifetime_totals and in the aggregates, which stay as they
are; only the detail goes. An older object not cleaned yet (verified, or flagged) is kept
and counted in `waiting`; it expires on a run after the cleaner is done with it.

Per day of the expiring objects, oldest first:
1. delete the objects from the bucket (idempotent);
2. in one transaction, mark their records `expired` (only records still `cleaned`) and
   mark the day in `meta.EXPIRED_DAY_DUE`;
3. settle the day's manifest: deleted once no object of the day is left in the bucket,
   else rewritten (`archiver.job.write_manifest`: each entry carries its record's status,
   so the expired ones say `expired`), and unmark the day.
A crash between 1 and 2 leaves records `cleaned` whose objects are gone: the next run
deletes them again (a no-op) and marks them. Days left marked (a killed run, a manifest
that failed to upload) are settled at the start of the next run. A run stops after
`[archive] max_objects_per_run` objects (`complete: false`); the next one goes on.

Replay names the expired hours of a range (`archiver.replay.expired_hours`) instead of
reporting their objects as missing.
"""

from __future__ import annotations

import logging
from datetime import datetime
from itertools import groupby
from typing import Any

import sqlalchemy as sa

from archiver.job import DAY_S, day_of, for_marked_days, write_manifest
from archiver.objects import manifest_key
from pipeline import clock, meta
from pipeline.clock import HOUR_S
from pipeline.env import Env
from pipeline.jobs import job
from pipeline.schema import FLAGGED, NOT_IN_BUCKET, ObjectStatus, archive_objects

log = logging.getLogger("edgepipe.expire")
_obj = archive_objects.c


def cutoff_s(env: Env, scheduled_for: datetime) -> float:
    return scheduled_for.timestamp() - env.config.retention.archive_days * DAY_S


def _candidates(conn: sa.Connection, cutoff: float, limit: int) -> list[Any]:
    """Cleaned objects whose hour ended at or before the cutoff, oldest first."""
    stmt = (
        sa.select(_obj.key, _obj.hour, _obj.row_count, _obj.size_bytes)
        .where(_obj.status == ObjectStatus.CLEANED, _obj.hour <= cutoff - HOUR_S)
        .order_by(_obj.hour, _obj.key)
        .limit(limit)
    )
    return list(conn.execute(stmt).all())


def _waiting(conn: sa.Connection, cutoff: float) -> int:
    """Objects old enough to expire whose rows are still in the database."""
    statuses = (ObjectStatus.VERIFIED, *FLAGGED)
    stmt = sa.select(sa.func.count()).where(_obj.status.in_(statuses), _obj.hour <= cutoff - HOUR_S)
    return int(conn.execute(stmt).scalar_one())


def settle_manifest(env: Env, day: str) -> str:
    """Bring the manifest of `day` (`YYYY-MM-DD`) in line with its records: `deleted` when
    no object of the day is left in the bucket, else `written`."""
    day_s = int(clock.parse_time(day))
    in_day = sa.and_(_obj.hour >= day_s, _obj.hour < day_s + DAY_S)
    with env.DB.read() as conn:
        left = conn.execute(sa.select(sa.func.count()).where(in_day, _obj.status.not_in(NOT_IN_BUCKET))).scalar_one()
    if left:
        write_manifest(env, day)
        return "written"
    env.require_archive().delete(manifest_key(env.config.archive.prefix, day))
    with env.DB.transaction() as conn:  # the archiver would write the manifest of a due day back
        token = meta.marks(conn, meta.MANIFEST_DUE).get(day)
        if token is not None:
            meta.unmark(conn, meta.MANIFEST_DUE, day, token)
    return "deleted"


def settle_due_days(env: Env, result: dict[str, Any]) -> None:
    """Settle the manifest of every day marked `EXPIRED_DAY_DUE` (see
    `archiver.job.for_marked_days`): `manifests_written` or `manifests_deleted`."""
    for_marked_days(env, meta.EXPIRED_DAY_DUE, result, lambda day: f"manifests_{settle_manifest(env, day)}")


def expire_day(env: Env, day: str, objects: list[Any]) -> int:
    """Delete the objects (all of one day) from the bucket, then mark their records
    expired and the day due, in one transaction; return the records marked."""
    store = env.require_archive()
    for obj in objects:
        store.delete(obj.key)
    with env.DB.transaction() as conn:
        marked = conn.execute(
            sa.update(archive_objects)
            .where(_obj.key.in_([o.key for o in objects]), _obj.status == ObjectStatus.CLEANED)
            .values(status=ObjectStatus.EXPIRED)
        ).rowcount
        meta.mark(env.DB, conn, meta.EXPIRED_DAY_DUE, day)
    return int(marked)


@job("expire")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    days = env.config.retention.archive_days
    result: dict[str, Any] = {"archive_days": days, "dry_run": dry_run, "cutoff": None, "objects": 0, "rows": 0}
    result |= {"bytes": 0, "days": 0, "waiting": 0, "complete": True, "manifests_written": 0, "manifests_deleted": 0}
    if not days:
        result["skipped"] = "[retention] archive_days = 0: archive objects are kept forever"
        return result
    cutoff = cutoff_s(env, scheduled_for)
    limit = env.config.archive.max_objects_per_run
    result["cutoff"] = clock.iso(cutoff)
    if not dry_run:
        settle_due_days(env, result)
    with env.DB.read() as conn:
        objects = _candidates(conn, cutoff, limit + 1)
        result["waiting"] = _waiting(conn, cutoff)
    if len(objects) > limit:
        objects, result["complete"] = objects[:limit], False
    for day, group in groupby(objects, key=lambda o: day_of(o.hour)):
        batch = list(group)
        if not dry_run:
            expire_day(env, day, batch)
        result["days"] += 1
        result["objects"] += len(batch)
        result["rows"] += sum(o.row_count for o in batch)
        result["bytes"] += sum(o.size_bytes for o in batch)
    if not dry_run:
        settle_due_days(env, result)
    log.info("expire_run %s", " ".join(f"{k}={v}" for k, v in result.items()))
    return result
