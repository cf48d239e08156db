"""The rollup job (00:15): closed UTC days of hourly aggregates become daily rows, and
`[retention] hourly_days` prunes the hourly rows of old days.

Rolling a day replaces its rows in `path_stats_daily` by the fold of its hourly rows
(every summed column and histogram bucket summed, the min of `rt_min_ms`, the max of
`rt_max_ms`: histograms merge by addition, so percentiles stay estimable) in one
transaction; rolling a day again gives the same rows. Each run rolls
* every closed day (one that ended at or before the scheduled time) not rolled up yet:
  the days from `meta.ROLLUP_THROUGH` on (from the oldest hourly row on the first run);
* the last `detail_days + 1` closed days again, and every day from the archive watermark's
  on, which can still receive late events (the consumer refuses only events older than
  the archive watermark);
never a day before `meta.HOURLY_PRUNED_BEFORE`: its hourly rows are gone, its daily rows
are final.

Pruning (`hourly_days` > 0): a day is pruned once it ended `hourly_days` before the
scheduled time AND at or before the archive watermark (no event can land in it any
more: with no archive run yet, nothing is pruned). Per day, in ONE transaction: roll it
up again, delete its hourly rows (their requests must add up to the daily rows', else the
transaction rolls back) and move `HOURLY_PRUNED_BEFORE` past it. The totals count the
daily rows of the days before that watermark (`pipeline.totals`), so hot + cold == total
holds at every commit.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.env import Env
from pipeline.errors import IntegrityError
from pipeline.jobs import job
from pipeline.schema import BUCKET_COLUMNS, STATUS_COLUMNS, path_stats_daily, path_stats_hourly

log = logging.getLogger("edgepipe.rollup")
DAY_S = 86_400
KEYS = ("host", "path", "method")
SUMMED = ("requests", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms", *BUCKET_COLUMNS)
DAILY_COLUMNS = ("day", *KEYS, *SUMMED, "rt_min_ms", "rt_max_ms")
_hourly, _daily = path_stats_hourly, path_stats_daily


def day_start(ts_s: float) -> int:
    """00:00 UTC of the day holding `ts_s`, in epoch seconds."""
    return int(ts_s) // DAY_S * DAY_S


def _in_day(day_s: int) -> Any:
    return sa.and_(_hourly.c.hour >= day_s, _hourly.c.hour < day_s + DAY_S)


def _fold_day(day_s: int) -> sa.Select[Any]:
    """The daily rows of `day_s`, computed from its hourly rows (`DAILY_COLUMNS` order)."""
    return (
        sa.select(
            sa.literal(day_s, sa.BigInteger).label("day"),
            *(_hourly.c[k] for k in KEYS),
            # cast: PostgreSQL's SUM of a bigint is a numeric
            *(sa.cast(sa.func.sum(_hourly.c[c]), _hourly.c[c].type).label(c) for c in SUMMED),
            sa.func.min(_hourly.c.rt_min_ms).label("rt_min_ms"),
            sa.func.max(_hourly.c.rt_max_ms).label("rt_max_ms"),
        )
        .where(_in_day(day_s))
        .group_by(*(_hourly.c[k] for k in KEYS))
    )


def roll_day(conn: sa.Connection, day_s: int) -> int:
    """Replace the daily rows of the day starting at `day_s` by the fold of its hourly
    rows, in the caller's transaction; return the daily rows written."""
    conn.execute(sa.delete(_daily).where(_daily.c.day == day_s))
    conn.execute(sa.insert(_daily).from_select(DAILY_COLUMNS, _fold_day(day_s)))
    return int(conn.execute(sa.select(sa.func.count()).where(_daily.c.day == day_s)).scalar_one())


def prune_day(env: Env, day_s: int) -> tuple[int, int]:
    """In one transaction: roll the day up again, delete its hourly rows and move the
    pruning watermark past it. (daily rows, hourly rows deleted). IntegrityError, changing
    nothing, when the deleted rows do not add up to the daily rows (a late write)."""
    with env.DB.transaction() as conn:
        rows = roll_day(conn, day_s)
        want = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(_daily.c.requests), 0)).where(_daily.c.day == day_s)
        ).scalar_one()
        gone = list(conn.execute(sa.delete(_hourly).where(_in_day(day_s)).returning(_hourly.c.requests)).scalars())
        if sum(gone) != want:
            raise IntegrityError(f"rollup of {clock.iso(day_s)[:10]}: deleted hourly rows hold {sum(gone)} requests, "
                                 f"the daily rows {want}")  # fmt: skip
        meta.put(env.DB, conn, meta.HOURLY_PRUNED_BEFORE, str(day_s + DAY_S))
    return rows, len(gone)


def _days_with_rows(conn: sa.Connection, lo: int, hi: int) -> list[int]:
    """The days in [lo, hi) that hold hourly rows, in order."""
    day = _hourly.c.hour - _hourly.c.hour % DAY_S
    stmt = sa.select(day).where(_hourly.c.hour >= lo, _hourly.c.hour < hi).group_by(day).order_by(day)
    return [int(d) for d in conn.execute(stmt).scalars()]


def _first_unrolled(conn: sa.Connection, pruned: int) -> int | None:
    """The first day not rolled up yet: `ROLLUP_THROUGH`, or on the first run the day of
    the oldest hourly row (None: no hourly row at all)."""
    through = meta.get(conn, meta.ROLLUP_THROUGH)
    if through is not None:
        return int(through)
    oldest = conn.execute(sa.select(sa.func.min(_hourly.c.hour)).where(_hourly.c.hour >= pruned)).scalar()
    return None if oldest is None else day_start(oldest)


def _plan(env: Env, conn: sa.Connection, scheduled_s: float) -> dict[str, Any]:
    """What this run rolls and prunes (see the module docstring)."""
    retention = env.config.retention
    closed_end = day_start(scheduled_s)
    pruned = meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE)
    watermark_s = meta.archive_watermark_ms(env.DB, conn) // 1000
    open_from = closed_end - (retention.detail_days + 1) * DAY_S
    if watermark_s:
        open_from = min(open_from, day_start(watermark_s))
    first = _first_unrolled(conn, pruned)
    start = max(pruned, open_from if first is None else min(first, open_from))
    plan = {"closed_end": closed_end, "pruned": pruned, "days": _days_with_rows(conn, start, closed_end)}
    prune_to = pruned
    if retention.hourly_days and watermark_s:
        prune_to = max(pruned, min(day_start(scheduled_s - retention.hourly_days * DAY_S), day_start(watermark_s)))
    plan["prune_to"] = prune_to
    plan["prune_days"] = _days_with_rows(conn, pruned, prune_to) if prune_to > pruned else []
    if retention.hourly_days and not watermark_s:
        plan["prune_note"] = "no archive watermark yet (the archive job never ran): nothing pruned"
    return plan


def _iso_day(day_s: int | None) -> str | None:
    return None if not day_s else clock.iso(day_s)


@job("rollup")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    with env.DB.read() as conn:
        plan = _plan(env, conn, scheduled_for.timestamp())
    days, prune_days = plan["days"], plan["prune_days"]
    rolled = sorted({*days, *prune_days})  # a pruned day is rolled up in its pruning transaction
    result: dict[str, Any] = {
        "dry_run": dry_run,
        "closed_before": clock.iso(plan["closed_end"]),
        "days": len(rolled),
        "first_day": _iso_day(rolled[0]) if rolled else None,
        "last_day": _iso_day(rolled[-1]) if rolled else None,
        "daily_rows": 0,
        "hourly_days": env.config.retention.hourly_days,
        "pruned_days": len(prune_days),
        "hourly_rows_pruned": 0,
        "hourly_pruned_before": _iso_day(plan["prune_to"]),
    }
    if "prune_note" in plan:
        result["prune_note"] = plan["prune_note"]
    if dry_run:
        return result
    for day_s in days:
        if day_s < plan["prune_to"]:
            continue  # pruned below, rolled up in the same transaction
        with env.DB.transaction() as conn:
            result["daily_rows"] += roll_day(conn, day_s)
    with env.DB.transaction() as conn:
        if int(meta.get(conn, meta.ROLLUP_THROUGH) or 0) < plan["closed_end"]:
            meta.put(env.DB, conn, meta.ROLLUP_THROUGH, str(plan["closed_end"]))
    for day_s in prune_days:
        rows, gone = prune_day(env, day_s)
        result["daily_rows"] += rows
        result["hourly_rows_pruned"] += gone
    if plan["prune_to"] > plan["pruned"]:  # past the days in between that held no hourly row
        with env.DB.transaction() as conn:
            if meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE) < plan["prune_to"]:
                meta.put(env.DB, conn, meta.HOURLY_PRUNED_BEFORE, str(plan["prune_to"]))
    log.info("rollup_run %s", " ".join(f"{k}={v}" for k, v in result.items()))
    return result
