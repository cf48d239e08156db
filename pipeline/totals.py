"""Hot, cold and total counts, and the checks behind `edgepipe verify`.

hot   = detail rows still in `traffic_events` that are counted there (archive_state 0 or
        1; restored rows, state 2, are already in cold);
cold  = `lifetime_totals` (scope `all`), filled by the cleaner in the same transaction
        that deletes the rows;
total = the sum of the aggregates: every hourly row, plus the daily rows of the days whose
        hourly rows were pruned (`[retention] hourly_days`: the `rollup` job folds a day's
        hourly rows into daily rows, deletes them and moves the watermark
        `meta.HOURLY_PRUNED_BEFORE` past the day, in one transaction).
The invariant hot + cold == total holds at every commit. All three, and the watermark,
are read in ONE statement, so a consumer or a rollup committing meanwhile cannot make a
consistent database look inconsistent (READ COMMITTED gives each statement its own
snapshot).
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.bindings.db import Database
from pipeline.clock import HOUR_MS
from pipeline.schema import (
    FLAGGED,
    STATUS_COLUMNS,
    ArchiveState,
    ObjectStatus,
    archive_objects,
    lifetime_totals,
    path_stats_daily,
    path_stats_hourly,
    traffic_events,
)

SCOPE = "all"
FIELDS = ("events", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms")


def event_sums(c: Any = traffic_events.c) -> list[Any]:
    """SUM expressions in `FIELDS` order over the columns `c` of `traffic_events` rows (or
    of a subquery of them: the cleaner sums each batch with these)."""
    sums: list[sa.ColumnElement[Any]] = [sa.func.count()]
    for k in range(1, 6):
        sums.append(sa.func.coalesce(sa.func.sum(sa.case((c.status.between(k * 100, k * 100 + 99), 1), else_=0)), 0))
    sums.append(sa.func.coalesce(sa.func.sum(sa.func.coalesce(c.bytes, 0)), 0))
    sums.append(sa.func.coalesce(sa.func.sum(c.response_time_ms), 0.0))
    return sums


def _scalar_subqueries() -> list[Any]:
    hot = sa.select(*event_sums()).where(traffic_events.c.archive_state != ArchiveState.RESTORED).subquery()
    cold = sa.select(*(lifetime_totals.c[f] for f in FIELDS)).where(lifetime_totals.c.scope == SCOPE).subquery()
    total_cols = ["requests", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms"]
    pruned = path_stats_daily.c.day < sa.func.coalesce(meta.int_value(meta.HOURLY_PRUNED_BEFORE), 0)
    total = [
        sa.select(sa.func.coalesce(sa.func.sum(path_stats_hourly.c[c]), 0)).scalar_subquery()
        + sa.select(sa.func.coalesce(sa.func.sum(path_stats_daily.c[c]), 0)).where(pruned).scalar_subquery()
        for c in total_cols
    ]
    hot_cols = [sa.select(c).scalar_subquery() for c in hot.c]
    cold_cols = [sa.select(sa.func.coalesce(sa.func.max(c), 0)).scalar_subquery() for c in cold.c]
    return hot_cols + cold_cols + total


def _typed(values: list[Any]) -> dict[str, Any]:
    return {f: (float(v) if f == "rt_sum_ms" else int(v)) for f, v in zip(FIELDS, values, strict=True)}


def stats(db: Database) -> dict[str, Any]:
    """{"hot": {...}, "cold": {...}, "total": {...}, "deployment_started_at": "…"}."""
    n = len(FIELDS)
    with db.read() as conn:
        row = list(conn.execute(sa.select(*_scalar_subqueries())).one())
        started = meta.get(conn, meta.DEPLOYMENT_START)
    return {
        "hot": _typed(row[:n]),
        "cold": _typed(row[n : 2 * n]),
        "total": _typed(row[2 * n :]),
        "deployment_started_at": started,
    }


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def check_totals(s: dict[str, Any]) -> list[str]:
    problems = []
    for f in FIELDS:
        hot, cold, total = s["hot"][f], s["cold"][f], s["total"][f]
        ok = _close(hot + cold, total) if f == "rt_sum_ms" else hot + cold == total
        if not ok:
            problems.append(f"{f}: hot {hot} + cold {cold} != total {total}")
    return problems


def check_archive(db: Database) -> list[str]:
    """Every recorded object agrees with the rows it claims in the database: a verified
    object still holds exactly `row_count` rows in state 1, a cleaned one none, and no
    row is in state 1 without a verified (or flagged) object; flagged objects (`corrupt`,
    `mismatch`) are reported. `pending` and `replaced` records hold nothing and are no
    problem: a replaced object's rows went back to the archive queue (the state-1 rows in
    its range, if any, are those of the object that replaced it). An `expired` object (deleted
    from the bucket by the `expire` job) is a cleaned one whose detail is gone: it holds no
    row either, its rows counted in cold."""
    problems: list[str] = []
    state1 = sa.and_(
        traffic_events.c.archive_state == ArchiveState.ARCHIVED,
        traffic_events.c.ts >= archive_objects.c.hour * 1000,
        traffic_events.c.ts < archive_objects.c.hour * 1000 + HOUR_MS,
    )
    in_object = sa.and_(state1, traffic_events.c.seq.between(archive_objects.c.min_seq, archive_objects.c.max_seq))
    held = sa.select(sa.func.count()).where(in_object).correlate(archive_objects).scalar_subquery()
    stmt = sa.select(
        archive_objects.c.key,
        archive_objects.c.status,
        archive_objects.c.row_count,
        archive_objects.c.cleaned_rows,
        archive_objects.c.error,
        held.label("held"),
    )
    with db.read() as conn:
        objects = conn.execute(stmt.order_by(archive_objects.c.hour, archive_objects.c.key)).all()
        marked = conn.execute(
            sa.select(sa.func.count()).where(traffic_events.c.archive_state == ArchiveState.ARCHIVED)
        ).scalar_one()
    expected_marked = 0
    for key, status, rows, cleaned, error, held_rows in objects:
        if status in FLAGGED:
            problems.append(f"{key}: flagged {status}: {error}")
        elif status == ObjectStatus.VERIFIED and held_rows != rows - cleaned:
            problems.append(f"{key}: {held_rows} archived rows in the database, expected {rows - cleaned}")
        elif status in (ObjectStatus.CLEANED, ObjectStatus.EXPIRED) and held_rows:
            problems.append(f"{key}: {status} but {held_rows} rows remain")
        if status == ObjectStatus.VERIFIED or status in FLAGGED:
            expected_marked += held_rows
    if marked != expected_marked:
        problems.append(f"{marked} rows marked archived, {expected_marked} held by recorded objects")
    return problems


def check_rollup(db: Database) -> list[str]:
    """No hourly row is left before the pruning watermark: the daily rows of those days
    are counted in the total, so such a row (one brought back by hand) would count twice."""
    with db.read() as conn:
        before = meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE)
        n = conn.execute(sa.select(sa.func.count()).where(path_stats_hourly.c.hour < before)).scalar_one()
    if not n:
        return []
    return [f"{n} hourly rows before {clock.iso(before)}, where the daily rows hold the pruned days"]


def verify(db: Database) -> dict[str, Any]:
    """Run every check; `ok` is false when any fails."""
    s = stats(db)
    problems = check_totals(s) + check_archive(db) + check_rollup(db)
    return {"ok": not problems, "problems": problems, "stats": s}
