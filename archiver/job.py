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
duplicate could no longer be detected (`watermark_status` / `repair_watermark` inspect and
lower a watermark that a future-dated run pushed too far).

Before archiving, the run also repairs what earlier failures left: temp files and
incomplete multipart uploads older than an hour (`ObjectStore.cleanup`), pending records
(above), manifests still due (below), and objects the cleaner flagged `corrupt` or
`mismatch`, whose rows go back to the archive queue and into new objects of this very run
(`repair_flagged`).

Manifests: the day of every object recorded `pending` is marked due (`meta.MANIFEST_DUE`)
in the same transaction; the run writes the manifest of every due day at its start and at
its end, and unmarks a day only once its manifest is written, so the next run makes good a
killed run or a failed manifest upload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from archiver.objects import (
    ROW_FIELDS,
    check_stored,
    encode,
    manifest_key,
    object_key,
)
from pipeline import clock, meta
from pipeline.clock import HOUR_MS
from pipeline.env import Env
from pipeline.errors import IntegrityError, TransientError
from pipeline.jobs import job
from pipeline.schema import FLAGGED, HOLDS_NOTHING, ArchiveState, ObjectStatus, archive_objects, traffic_events

log = logging.getLogger("edgepipe.archiver")
DAY_S = 86_400
TMP_MAX_AGE_S = 3600.0  # temp files and multipart uploads older than this were left by a dead writer
AHEAD_SLACK_MS = 60_000  # a watermark further than this past the retention cutoff is "ahead"
SELECT_COLUMNS = [traffic_events.c[c] for c in ROW_FIELDS]
FETCH = 5000


def cutoff_ms(env: Env, scheduled_for: datetime) -> int:
    return int((scheduled_for - timedelta(days=env.config.retention.detail_days)).timestamp() * 1000)


def day_of(hour_s: int) -> str:
    """`YYYY-MM-DD` of the UTC day holding an hour (epoch seconds)."""
    return clock.iso(hour_s - hour_s % DAY_S)[:10]


def _in_hour(hour_s: int) -> Any:
    return sa.and_(traffic_events.c.ts >= hour_s * 1000, traffic_events.c.ts < hour_s * 1000 + HOUR_MS)


def _next_rows(whole_hour: bool) -> sa.Select[Any]:
    """The rows of the next object (see `archive_next`); binds `lo`, `hi`, `cutoff`, `after`
    and, unless `whole_hour`, `limit`."""
    ts = traffic_events.c.ts
    stmt = sa.select(*SELECT_COLUMNS).where(
        ts >= sa.bindparam("lo"), ts < sa.bindparam("hi"), ts < sa.bindparam("cutoff"),
        traffic_events.c.archive_state == ArchiveState.HOT, traffic_events.c.seq > sa.bindparam("after"),
    )  # fmt: skip
    if not whole_hour:  # sort the hour's rows found by the ts index, never walk the whole table by seq
        stmt = stmt.order_by(traffic_events.c.seq + 0).limit(sa.bindparam("limit", type_=sa.Integer))
    return stmt


def hour_counts(conn: sa.Connection, cutoff: int) -> list[tuple[int, int]]:
    """(event hour in epoch s, rows) of the unarchived rows older than the cutoff."""
    hour = traffic_events.c.ts // HOUR_MS
    stmt = (
        sa.select(hour, sa.func.count())
        .where(traffic_events.c.ts < cutoff, traffic_events.c.archive_state == ArchiveState.HOT)
        .group_by(hour)
    )
    return [(int(h) * 3600, int(n)) for h, n in conn.execute(stmt.order_by(hour))]


def _object_rows(hour_s: int, cutoff: int, first: int, last: int, state: int = ArchiveState.HOT) -> Any:
    return sa.and_(
        _in_hour(hour_s),
        traffic_events.c.ts < cutoff,
        traffic_events.c.seq.between(first, last),
        traffic_events.c.archive_state == state,
    )


def _drop_pending(env: Env, key: str) -> None:
    """Delete the object `key` from the bucket, then its `pending` record."""
    env.require_archive().delete(key)
    with env.DB.transaction() as conn:
        conn.execute(
            sa.delete(archive_objects).where(
                archive_objects.c.key == key, archive_objects.c.status == ObjectStatus.PENDING
            )
        )


def recover_pending(env: Env) -> int:
    """Delete the objects (and records) of uploads a crashed run never recorded."""
    pending = sa.select(archive_objects.c.key).where(archive_objects.c.status == ObjectStatus.PENDING)
    with env.DB.read() as conn:
        keys = list(conn.execute(pending).scalars())
    for key in keys:
        _drop_pending(env, key)
        log.warning("archive_recovered key=%s", key)
    return len(keys)


def _free_key(conn: sa.Connection, prefix: str, hour_s: int, first: int, last: int) -> str:
    """The deterministic key, suffixed only if an older recorded object already took it
    (possible when SQLite reuses the seqs of deleted rows)."""
    retry = 0
    while True:
        key = object_key(prefix, hour_s, first, last, retry)
        if conn.execute(sa.select(archive_objects.c.key).where(archive_objects.c.key == key)).first() is None:
            return key
        retry += 1


def archive_next(env: Env, hour_s: int, cutoff: int, after_seq: int, whole_hour: bool) -> dict[str, Any] | None:
    """Archive the next object of one hour: its first `max_rows_per_object` unarchived
    rows with seq > `after_seq`, in seq order; or, `whole_hour`, when they all fit in one
    object, all of them in the order the ts index finds them (no sort). None when the
    hour has nothing left."""
    db, store, cfg = env.DB, env.require_archive(), env.config.archive
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
                sa.insert(archive_objects).values(
                    key=key, hour=hour_s, status=ObjectStatus.PENDING, row_count=enc.rows, min_seq=enc.min_seq,
                    max_seq=enc.max_seq, created_at=clock.now_s(),
                )
            )  # fmt: skip
            meta.mark(db, conn, meta.MANIFEST_DUE, day_of(hour_s))
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


def _mark(env: Env, key: str, hour_s: int, cutoff: int, enc: Any) -> None:
    """Mark the object's rows archived and the object verified, in one transaction."""
    with env.DB.transaction() as conn:
        marked = conn.execute(
            sa.update(traffic_events)
            .where(_object_rows(hour_s, cutoff, enc.min_seq, enc.max_seq))
            .values(archive_state=ArchiveState.ARCHIVED)
        ).rowcount
        if marked != enc.rows:
            raise IntegrityError(f"{key}: {marked} rows to mark, object holds {enc.rows}")
        conn.execute(
            sa.update(archive_objects)
            .where(archive_objects.c.key == key)
            .values(
                status=ObjectStatus.VERIFIED, size_bytes=enc.size, sha256=enc.sha256, min_ts=enc.min_ts,
                max_ts=enc.max_ts, verified_at=clock.now_s(),
            )
        )  # fmt: skip


def _abandon(env: Env, key: str) -> None:
    """Best effort after a failure: remove the object and its pending record. If this
    fails too, the pending record stays and the next run's recovery does it."""
    try:
        _drop_pending(env, key)
    except Exception as exc:
        log.warning("archive_abandon_failed key=%s error=%s", key, exc)


def clean_temp(env: Env, result: dict[str, Any]) -> int:
    """Best effort: remove what killed or failed uploads left in the store (temp files,
    incomplete multipart uploads) older than `TMP_MAX_AGE_S`; a failure is logged and
    reported (`tmp_cleanup_error`), never fatal."""
    try:
        return int(env.require_archive().cleanup(TMP_MAX_AGE_S))
    except Exception as exc:
        log.warning("archive_tmp_cleanup_failed error=%s", exc)
        result["tmp_cleanup_error"] = f"{type(exc).__name__}: {exc}"
        return 0


# -- taking back flagged objects -------------------------------------------------------


def _rows_still_held(obj: Any) -> Any:
    """The rows an object holds in the database: its hour, its seq range, state 1 (the
    cleaner's and `totals.check_archive`'s definition)."""
    return sa.and_(
        _in_hour(obj.hour),
        traffic_events.c.seq.between(obj.min_seq, obj.max_seq),
        traffic_events.c.archive_state == ArchiveState.ARCHIVED,
    )


def _replace(env: Env, obj: Any) -> int | None:
    """In one transaction: mark the flagged record `replaced` (the reason in `error`),
    return its rows still marked archived to state 0 and mark its day's manifest due.
    The rows reset, or None when the record was no longer in the state read."""
    with env.DB.transaction() as conn:
        reason = f"replaced: was {obj.status}: {obj.error or '?'}"
        record = sa.update(archive_objects).where(
            archive_objects.c.key == obj.key, archive_objects.c.status == obj.status
        )
        taken = conn.execute(record.values(status=ObjectStatus.REPLACED, error=reason[:2000])).rowcount
        if not taken:
            return None
        reset = conn.execute(
            sa.update(traffic_events).where(_rows_still_held(obj)).values(archive_state=ArchiveState.HOT)
        ).rowcount
        meta.mark(env.DB, conn, meta.MANIFEST_DUE, day_of(obj.hour))
    return int(reset)


def repair_flagged(env: Env, result: dict[str, Any]) -> None:
    """Take back every object the cleaner flagged (`corrupt`: the stored object is missing
    or does not match; `mismatch`: its rows do not match its count), so that this run
    archives its rows again, in a new object under a new key:
    1. delete its key from the bucket: when that fails, it is logged and the object stays
       flagged for the next run, so the bucket never holds it beside its replacement;
    2. `_replace` (one transaction).
    An object already partly cleaned stays flagged (`repair_skipped`): its cleaned rows
    exist only in that object, deleting it would lose their detail; an operator decides."""
    cols = (
        archive_objects.c.key,
        archive_objects.c.hour,
        archive_objects.c.status,
        archive_objects.c.min_seq,
        archive_objects.c.max_seq,
        archive_objects.c.cleaned_rows,
        archive_objects.c.error,
    )
    with env.DB.read() as conn:
        flagged = conn.execute(
            sa.select(*cols)
            .where(archive_objects.c.status.in_(FLAGGED))
            .order_by(archive_objects.c.hour, archive_objects.c.key)
        ).all()
    for obj in flagged:
        if obj.cleaned_rows:
            log.error("archive_repair_skipped key=%s cleaned_rows=%d reason=partly_cleaned", obj.key, obj.cleaned_rows)
            result.setdefault("repair_skipped", []).append(obj.key)
            continue
        try:
            env.require_archive().delete(obj.key)
        except Exception as exc:
            log.warning("archive_repair_delete_failed key=%s error=%s", obj.key, exc)
            result.setdefault("repair_skipped", []).append(obj.key)
            continue
        reset = _replace(env, obj)
        if reset is not None:
            log.warning("archive_replaced key=%s was=%s rows_reset=%d", obj.key, obj.status, reset)
            result["repaired"] += 1


# -- manifests -------------------------------------------------------------------------

MANIFEST_FIELDS = ("key", "hour", "status", "row_count", "size_bytes", "sha256", "min_ts", "max_ts", "min_seq",
                   "max_seq")  # fmt: skip


def write_manifest(env: Env, day: str) -> bool:
    """Rewrite the manifest of `day` (`YYYY-MM-DD`): every object of the day in the bucket
    (recorded in `archive_objects`, neither pending nor replaced) with its status and
    metadata, in key order, and the day's totals. False, writing nothing, when the day has
    no record at all (an upload that failed)."""
    day_s = int(clock.parse_time(day))
    with env.DB.read() as conn:
        rows = conn.execute(
            sa.select(*(archive_objects.c[f] for f in MANIFEST_FIELDS))
            .where(
                archive_objects.c.hour >= day_s,
                archive_objects.c.hour < day_s + DAY_S,
                archive_objects.c.status != ObjectStatus.PENDING,
            )
            .order_by(archive_objects.c.key)
        ).all()
    if not rows:
        return False
    entries = [dict(zip(MANIFEST_FIELDS, r, strict=True)) for r in rows if r.status != ObjectStatus.REPLACED]
    totals = {"objects": len(entries), "rows": sum(e["row_count"] for e in entries)}
    totals["bytes"] = sum(e["size_bytes"] for e in entries)
    doc = {"format": "edgepipe-manifest/1", "day": day, "generated_at": clock.iso(clock.now_s()), **totals}
    env.require_archive().put_bytes(
        manifest_key(env.config.archive.prefix, day),
        orjson.dumps(doc | {"entries": entries}, option=orjson.OPT_INDENT_2),
        {k: str(v) for k, v in totals.items()},
    )
    return True


def for_marked_days(env: Env, mark: str, result: dict[str, Any], work: Callable[[str], str | None]) -> None:
    """`work(day)` for every day marked `mark` (a `meta` mark set), unmarking the day once
    it returns (unless the day was marked again meanwhile); the result key it returns is
    counted in `result`. Never raises: a failure is logged and reported
    (`manifest_error`), the day stays marked and the next run does it."""
    try:
        with env.DB.read() as conn:
            due = meta.marks(conn, mark)
    except Exception as exc:
        _manifest_failed(result, "*", exc)
        return
    for day, token in sorted(due.items()):
        try:
            counted = work(day)
            with env.DB.transaction() as conn:
                meta.unmark(conn, mark, day, token)
        except Exception as exc:
            _manifest_failed(result, day, exc)
            continue
        if counted:
            result[counted] += 1


def _manifest_failed(result: dict[str, Any], day: str, exc: Exception) -> None:
    log.warning("manifest_failed day=%s error=%s", day, exc)
    result["manifest_error"] = f"{type(exc).__name__}: {exc}"


def write_due_manifests(env: Env, result: dict[str, Any]) -> None:
    """Write the manifest of every day marked due (see `for_marked_days`); the objects and
    their records are what counts, a manifest failing is made good by the next run."""
    for_marked_days(env, meta.MANIFEST_DUE, result, lambda day: "manifests" if write_manifest(env, day) else None)


def raise_watermark(env: Env, cutoff: int) -> int:
    with env.DB.transaction() as conn:
        current = meta.archive_watermark_ms(env.DB, conn)
        if cutoff > current:
            meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(cutoff))
            return cutoff
        return current


def _iso_ms(value: int) -> str | None:
    return None if not value else clock.iso(value / 1000)


def _watermark_facts(env: Env, conn: sa.Connection) -> tuple[int, int, int]:
    """(watermark, policy cutoff, safe floor) in epoch ms. Policy cutoff = now −
    `detail_days`; safe floor = max(policy cutoff, 1 + the newest `max_ts` of any recorded
    object that is neither pending nor replaced): the rows of those objects have left or
    will leave the hot table, so a duplicate of one could no longer be detected."""
    watermark = meta.archive_watermark_ms(env.DB, conn)
    policy = clock.now_ms() - env.config.retention.detail_days * DAY_S * 1000
    newest_ts = sa.func.max(
        sa.func.coalesce(archive_objects.c.max_ts, archive_objects.c.hour * 1000 + HOUR_MS - 1)
    )  # no max_ts: its hour's end
    newest = conn.execute(sa.select(newest_ts).where(archive_objects.c.status.not_in(HOLDS_NOTHING))).scalar()
    return watermark, policy, policy if newest is None else max(policy, int(newest) + 1)


def watermark_status(env: Env) -> dict[str, Any]:
    """`edgepipe watermark show`: the watermark, the retention policy's cutoff, whether the
    watermark is ahead of it (by more than `AHEAD_SLACK_MS`) and the safe floor."""
    with env.DB.read() as conn:
        watermark, policy, floor = _watermark_facts(env, conn)
    return {
        "watermark": _iso_ms(watermark),
        "watermark_ms": watermark,
        "policy_cutoff": clock.iso(policy / 1000),
        "ahead": watermark > policy + AHEAD_SLACK_MS,
        "safe_floor": clock.iso(floor / 1000),
    }


def repair_watermark(env: Env) -> dict[str, Any]:
    """`edgepipe watermark repair`: when the watermark is ahead of the policy cutoff, lower
    it to the safe floor (see `_watermark_facts`); otherwise change nothing. It never
    raises the watermark. Runs under the archive job's lease (a TransientError while the
    job runs), so no archive run raises the watermark or records objects meanwhile."""
    from pipeline.heartbeat import process_name
    from pipeline.jobruns import JobStore

    with JobStore(env.DB).lease("archive", process_name(), env.config.schedule.lease_seconds) as held:
        if not held:
            raise TransientError("the archive job is running; repair the watermark once it is done")
        with env.DB.transaction() as conn:
            before, policy, floor = _watermark_facts(env, conn)
            after = floor if before > policy + AHEAD_SLACK_MS and floor < before else before
            if after != before:
                meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(after))
    if after != before:
        log.warning("archive_watermark_lowered before=%s after=%s", _iso_ms(before), _iso_ms(after))
    return {"before": _iso_ms(before), "after": _iso_ms(after), "changed": after != before}


# -- the job ---------------------------------------------------------------------------


def _prepare(env: Env, cutoff: int, result: dict[str, Any]) -> None:
    """Before archiving: clear what killed or failed writes left, write the manifests an
    earlier run left due, raise the watermark, take back the flagged objects."""
    result["tmp_cleaned"] = clean_temp(env, result)
    result["recovered"] = recover_pending(env)
    write_due_manifests(env, result)
    result["watermark"] = clock.iso(raise_watermark(env, cutoff) / 1000)
    repair_flagged(env, result)


@job("archive")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    cutoff = cutoff_ms(env, scheduled_for)
    result: dict[str, Any] = {"cutoff": clock.iso(cutoff / 1000), "dry_run": dry_run, "objects": 0, "rows": 0}
    result |= {"bytes": 0, "raw_bytes": 0, "recovered": 0, "complete": True, "manifests": 0}
    result |= {"tmp_cleaned": 0, "repaired": 0}
    if not dry_run:
        _prepare(env, cutoff, result)
    with env.DB.read() as conn:
        hours = hour_counts(conn, cutoff)
    try:
        _archive_hours(env, hours, cutoff, dry_run, result)
    finally:  # the days of the objects written, even if a later one failed
        if not dry_run:
            write_due_manifests(env, result)
    # Hot rows older than the cutoff this run leaves (a dry run: all it would archive). The
    # watermark, raised before `hours` was read, keeps new ones out, so what was found less
    # what was archived is what is left; complete: nothing is (a run that stopped at
    # `max_objects_per_run` with its last object is complete too).
    result["remaining_rows"] = max(0, sum(n for _, n in hours) - (0 if dry_run else result["rows"]))
    result["complete"] = result["remaining_rows"] == 0
    log.info("archive_run %s", " ".join(f"{k}={v}" for k, v in result.items()))
    return result


def _archive_hours(env: Env, hours: list[tuple[int, int]], cutoff: int, dry_run: bool, result: dict[str, Any]) -> None:
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
            result["objects"] += 1
            for k in ("rows", "bytes", "raw_bytes"):
                result[k] += done[k]
        if not result["complete"]:
            break
