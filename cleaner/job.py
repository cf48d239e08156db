"""The clean job (03:00): move archived rows from hot to cold.

Only rows held by a `verified` object are deleted, and only after the object is checked
again in the bucket (`[archive] verify`: `full` re-hashes the body, `head` compares size
and stored checksum) shortly before the transaction that deletes its rows (helper threads
check a few dozen objects ahead, so the bucket's round trips overlap the database work:
`_Checks`); an object that fails is flagged `corrupt` and skipped, its rows stay (the next
archive run takes a flagged object back: see `archiver.job.repair_flagged`).

Transactions take WHOLE objects, about `[cleaner] batch_size` rows each: consecutive
objects (in hour, key order) share one transaction while their rows still held add up to
at most `batch_size`; an object holding more gets transactions of its own, `batch_size`
rows each in seq order (its `cleaned_rows` records the progress, so a run stopped midway
resumes there): no transaction holds the write lock, which the consumer waits for on
SQLite, for much more than `batch_size` rows, whatever the objects' size. Each
transaction sums the rows in SQL, deletes exactly those rows (the deleted count must
equal the summed one), adds the sums to `lifetime_totals` and advances each object's
`cleaned_rows` (marking it `cleaned` once whole), so hot + cold == total at every commit.
Counts are checked against the object: the rows it still holds must equal `row_count -
cleaned_rows` (for a whole object, and before the first batch of a large one), no batch
may take an object past its `row_count`, and an object with nothing left must be fully
counted. A mismatch rolls the transaction back and flags only that object `mismatch`; a
shared transaction is then redone without it, so the other objects are still cleaned.

A run goes on until no verified object is left (objects verified meanwhile included) or
`[cleaner] max_run_seconds` is spent, measured on `clock.monotonic()` between
transactions: the first transaction always runs. The result says whether it finished
(`complete`: nothing cleanable left) and what it left (`remaining_rows`: rows of verified
objects still held); the next run carries on.

The run also purges the dead letters older than `[consumer] dlq_retention_days`
(`dlq_purged`; they stay counted in the queue's lasting `rejected` counts) and the audit
rows older than `[audit] retention_days` (`audit_purged`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from archiver.objects import check_stored
from cleaner import stats_file
from pipeline import audit, clock
from pipeline.clock import HOUR_MS
from pipeline.dlq import purge_expired_letters
from pipeline.env import Env
from pipeline.errors import IntegrityError
from pipeline.jobs import job
from pipeline.schema import ArchiveState, ObjectStatus, archive_objects, lifetime_totals, traffic_events
from pipeline.totals import FIELDS, SCOPE, event_sums

log = logging.getLogger("edgepipe.cleaner")
CHECK_THREADS = 4  # objects checked in the bucket at once, ahead of the transactions (`_Checks`)
CHECK_AHEAD = 32  # how many objects ahead of the one being taken


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
_SUM_HELD = sa.select(*event_sums()).where(_HELD)  # a whole object's rows
# Marks a whole object cleaned, only while it is verified and still expects exactly `n` rows.
_MARK_WHOLE = (
    sa.update(archive_objects)
    .where(
        archive_objects.c.key == sa.bindparam("obj_key"),
        archive_objects.c.status == ObjectStatus.VERIFIED,
        archive_objects.c.row_count - archive_objects.c.cleaned_rows == sa.bindparam("n"),
    )
    .values(
        cleaned_rows=archive_objects.c.row_count, status=ObjectStatus.CLEANED, cleaned_at=sa.bindparam("cleaned_at")
    )
)
_OBJECT_STATE = sa.select(archive_objects.c.status, archive_objects.c.cleaned_rows, archive_objects.c.row_count).where(
    archive_objects.c.key == sa.bindparam("obj_key")
)
_LISTED = ("key", "hour", "row_count", "cleaned_rows", "min_seq", "max_seq", "size_bytes", "sha256")
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


class _Refused(Exception):
    """An object of a shared transaction did not check out: roll back, flag it, redo."""

    def __init__(self, key: str, error: str) -> None:
        super().__init__(error)
        self.key = key


def _take_whole(db: Any, conn: sa.Connection, obj: Any, now: float) -> list[Any]:
    """Inside the caller's transaction: delete every row `obj` still holds, mark it
    `cleaned`; its `FIELDS` sums (IntegrityError when its counts do not check out). The
    mark is guarded: it takes only a still verified record whose `row_count -
    cleaned_rows` equals the rows held, so the count check costs no statement of its own."""
    held = _held(obj)
    (sums,) = db.fetchall(conn, _SUM_HELD, HELD, held)
    n = sums[0]
    if db.execute(conn, _MARK_WHOLE, ("obj_key", "n", "cleaned_at"), (obj.key, n, now)) != 1:
        found = db.fetchall(conn, _OBJECT_STATE, ("obj_key",), (obj.key,))
        if not found or found[0][0] != ObjectStatus.VERIFIED:
            raise IntegrityError(f"{obj.key}: no longer verified")
        (_status, cleaned, rows), *_ = found
        raise IntegrityError(f"{obj.key}: {n} rows held, expected {rows - cleaned}")
    deleted = db.execute(conn, _DELETE_HELD, HELD, held) if n else 0
    if deleted != n:
        raise IntegrityError(f"{obj.key}: deleted {deleted} rows, the object summed {n}")
    return list(sums)


def clean_objects(env: Env, objects: Sequence[Any]) -> tuple[int, int]:
    """Delete every row the (small) `objects` hold, in ONE transaction: (rows deleted,
    objects that held rows). Raises `_Refused` naming the object that did not check out
    (nothing committed)."""
    db = env.DB
    with db.transaction() as conn:
        now = clock.now_s()
        total: list[Any] = [0] * len(FIELDS)
        holding = 0
        for obj in objects:
            try:
                sums = _take_whole(db, conn, obj, now)
            except IntegrityError as exc:
                raise _Refused(obj.key, str(exc)) from exc
            total = [a + b for a, b in zip(total, sums, strict=True)]
            holding += 1 if sums[0] else 0
        if total[0]:
            add_to_totals(db, conn, total)
    return int(total[0]), holding


def _left(obj: Any) -> int:
    """Rows `obj` still holds, by its record as listed."""
    return int(obj.row_count - obj.cleaned_rows)


def _verified(env: Env) -> list[Any]:
    with env.DB.read() as conn:
        return list(
            conn.execute(
                sa.select(*(archive_objects.c[c] for c in _LISTED))
                .where(archive_objects.c.status == ObjectStatus.VERIFIED)
                .order_by(archive_objects.c.hour, archive_objects.c.key)
            ).all()
        )


class _Checks:
    """`check_stored` of the listed objects, run ahead of the transactions on
    `CHECK_THREADS` helper threads, at most `CHECK_AHEAD` objects ahead of the one being
    taken: the bucket's round trips and the re-hash of the bodies overlap the database
    work (many small objects cost one check each). Each result is used at its object's
    turn, just before the transaction that deletes its rows; an error of a check is raised
    there too."""

    def __init__(self, env: Env, objects: Sequence[Any]) -> None:
        self.store, self.mode = env.require_archive(), env.config.archive.verify
        self.objects = objects
        self.submitted = 0
        self.pending: dict[int, Future[str | None]] = {}
        self.pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="edgepipe-clean-check")

    def problem(self, i: int) -> str | None:
        """Why object `i` does not match in the bucket, or None (see `check_stored`)."""
        while self.submitted < len(self.objects) and self.submitted <= i + CHECK_AHEAD:
            o = self.objects[self.submitted]
            self.pending[self.submitted] = self.pool.submit(
                check_stored, self.store, o.key, o.size_bytes, o.sha256 or "", self.mode
            )
            self.submitted += 1
        return self.pending.pop(i).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Run:
    """One clean run: its time budget and its result."""

    def __init__(self, env: Env, result: dict[str, Any]) -> None:
        self.env, self.result = env, result
        self.batch_size = env.config.cleaner.batch_size
        self.deadline = clock.monotonic() + env.config.cleaner.max_run_seconds
        self.worked = False  # a transaction ran: from now on the budget is checked

    def spent(self) -> bool:
        return self.worked and clock.monotonic() >= self.deadline

    def _refuse(self, key: str, status: str, error: str) -> None:
        flag(self.env, key, status, error)
        self.result["refused"].append(key)
        self.worked = True

    def stored_ok(self, checks: _Checks, i: int) -> bool:
        """Whether object `i` of the listing checked out in the bucket; flag it `corrupt`
        when it did not."""
        problem = checks.problem(i)
        if problem:
            self._refuse(checks.objects[i].key, ObjectStatus.CORRUPT, problem)
            return False
        return True

    def clean(self, objects: Sequence[Any]) -> bool:
        """Clean `objects` (listed verified, in hour, key order); False when the budget
        stopped the run."""
        checks = _Checks(self.env, objects)
        try:
            i = 0
            while i < len(objects):
                if self.spent():
                    return False
                obj, i = objects[i], i + 1
                if not self.stored_ok(checks, i - 1):
                    continue
                if _left(obj) > self.batch_size:
                    if not self.clean_large(obj):
                        return False
                    continue
                group, rows = [obj], _left(obj)
                while i < len(objects) and rows + _left(objects[i]) <= self.batch_size:
                    if self.stored_ok(checks, i):
                        group.append(objects[i])
                        rows += _left(objects[i])
                    i += 1
                self.clean_group(group)
            return True
        finally:
            checks.close()

    def clean_group(self, group: list[Any]) -> None:
        """One transaction for `group`; an object that does not check out is flagged and
        the transaction redone without it."""
        while group:
            try:
                n, holding = clean_objects(self.env, group)
            except _Refused as exc:
                self._refuse(exc.key, ObjectStatus.MISMATCH, str(exc))
                group = [o for o in group if o.key != exc.key]
                continue
            self.worked = True
            self.result["batches"] += 1
            self.result["rows"] += n
            self.result["objects"] += holding
            return

    def clean_large(self, obj: Any) -> bool:
        """`obj` holds more than `batch_size` rows: transactions of `batch_size` rows of it
        alone; False when the budget stopped it midway."""
        first = True
        while True:
            if not first and self.spent():
                return False
            try:
                n, done = clean_batch(self.env, obj, self.batch_size, first)
            except IntegrityError as exc:
                self._refuse(obj.key, ObjectStatus.MISMATCH, str(exc))
                return True
            self.worked = True
            if n:
                self.result["batches"] += 1
                self.result["rows"] += n
                self.result["objects"] += 1 if first else 0
            first = False
            if done:
                return True


def _remaining(env: Env) -> tuple[int, int]:
    """(verified objects, rows they still hold)."""
    left = sa.func.coalesce(sa.func.sum(archive_objects.c.row_count - archive_objects.c.cleaned_rows), 0)
    with env.DB.read() as conn:
        objects, rows = conn.execute(
            sa.select(sa.func.count(), left).where(archive_objects.c.status == ObjectStatus.VERIFIED)
        ).one()
    return int(objects), int(rows)


@job("clean")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"dry_run": dry_run, "objects": 0, "rows": 0, "batches": 0, "refused": []}
    if dry_run:
        objects = _verified(env)
        result["objects"] = len(objects)
        result["rows"] = result["remaining_rows"] = sum(_left(o) for o in objects)
        result["complete"] = not objects
        return result
    state, seen = _Run(env, result), set[str]()
    while True:  # until a listing finds nothing new (objects verified meanwhile are cleaned too)
        objects = [o for o in _verified(env) if o.key not in seen]
        seen.update(o.key for o in objects)
        if not objects or not state.clean(objects):
            break
    left_objects, result["remaining_rows"] = _remaining(env)
    result["complete"] = left_objects == 0
    result["dlq_purged"] = purge_expired_letters(env, scheduled_for.timestamp())
    result["audit_purged"] = audit.purge_expired(env.DB, env.config.audit.retention_days, scheduled_for.timestamp())
    if env.config.cleaner.reclaim_space and result["rows"]:
        result["reclaim"] = env.DB.reclaim_space()
    stats_file.record_run(
        env.DB,
        {
            "date": clock.iso(clock.now_s()),
            "scheduled_for": clock.iso(scheduled_for.timestamp()),
            "rows_cleaned": result["rows"],
            "objects": result["objects"],
            "reason": "rows of verified archive objects"
            + (f"; refused {len(result['refused'])}" if result["refused"] else "")
            + ("" if result["complete"] else f"; stopped, {result['remaining_rows']} rows left"),
        },
    )
    stats_file.write(env.DB, env.config.cleaner.stats_file)
    log.info("clean_run objects=%d rows=%d batches=%d refused=%d complete=%s remaining_rows=%d", result["objects"],
             result["rows"], result["batches"], len(result["refused"]), result["complete"],
             result["remaining_rows"])  # fmt: skip
    return result
