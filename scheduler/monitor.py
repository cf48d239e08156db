"""The capacity report (the `monitor` job, 04:00; `edgepipe monitor`).

What an operator needs before the database fills or the archiver falls behind: size of
the database and of each table, row counts, growth over the last 7 days and the projected
days until `[monitor] capacity_bytes` (10 GB by default, D1's limit), the age of the
oldest un-archived detail row, queue and DLQ depth, archive totals, the archive objects
flagged corrupt or mismatch (`archive_flagged`), and `alerts` naming every threshold
crossed.

Sizes: on SQLite from the `dbstat` table when the library has it (else the whole file
from page counts); on PostgreSQL `pg_total_relation_size` of edgepipe's own tables (the
server may hold other schemas). Growth compares with the size stored in the result of an
earlier `monitor` run, the one closest to 7 days ago (at least 6 hours back).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline import clock, log, meta
from pipeline.env import Env
from pipeline.jobs import job
from pipeline.schema import FLAGGED, HOLDS_NOTHING, ArchiveState, job_runs, metadata, traffic_events

DAY_S = 86400
MIN_GROWTH_SPAN_S = 6 * 3600


def sizes(db: Any) -> dict[str, Any]:
    tables = sorted(metadata.tables)
    total, per_table = db.sizes(tables)
    with db.read() as conn:
        existing = set(sa.inspect(conn).get_table_names())
        rows = {t: int(conn.execute(sa.select(sa.func.count()).select_from(metadata.tables[t])).scalar_one())
                for t in tables if t in existing}  # fmt: skip
    table_bytes = None if per_table is None else {t: per_table.get(t, 0) for t in tables if t in existing}
    return {"db_bytes": total, "table_bytes": table_bytes, "rows": rows}


def _earlier_size(db: Any, now_s: float) -> tuple[float, int] | None:
    """(time, db_bytes) of the stored monitor result closest to 7 days before `now_s`."""
    stmt = (
        sa.select(job_runs.c.finished_at, job_runs.c.result)
        .where(
            job_runs.c.job == "monitor",
            job_runs.c.status == "succeeded",
            job_runs.c.finished_at <= now_s - MIN_GROWTH_SPAN_S,
        )
        .where(job_runs.c.finished_at >= now_s - 8 * DAY_S)
        .order_by(sa.func.abs(job_runs.c.finished_at - (now_s - 7 * DAY_S)))
        .limit(1)
    )
    with db.read() as conn:
        row = conn.execute(stmt).first()
    if row is None or not row.result:
        return None
    size = orjson.loads(row.result).get("db_bytes")
    return None if size is None else (row.finished_at, int(size))


def _archive_totals(db: Any) -> dict[str, Any]:
    table = metadata.tables.get("archive_objects")
    if table is None or not {"row_count", "size_bytes"} <= set(table.c.keys()):
        return {"available": False}
    try:
        with db.read() as conn:
            objects, rows, size = conn.execute(
                sa.select(sa.func.count(), sa.func.sum(table.c.row_count), sa.func.sum(table.c.size_bytes)).where(
                    table.c.status.not_in(HOLDS_NOTHING)  # pending uploads and replaced objects are not in the bucket
                )
            ).one()
    except Exception:  # the table is declared but not created in this database yet
        return {"available": False}
    return {"available": True, "objects": int(objects), "rows": int(rows or 0), "bytes": int(size or 0)}


def _archive_flagged(db: Any) -> list[str]:
    """Keys of the archive objects flagged corrupt or mismatch (the next archive run
    replaces them; one still listed afterwards needs an operator)."""
    table = metadata.tables.get("archive_objects")
    if table is None:
        return []
    try:
        with db.read() as conn:
            return list(
                conn.execute(sa.select(table.c.key).where(table.c.status.in_(FLAGGED)).order_by(table.c.key)).scalars()
            )
    except Exception:  # the table is declared but not created in this database yet
        return []


def _oldest_unarchived_ms(db: Any) -> int | None:
    stmt = sa.select(sa.func.min(traffic_events.c.ts))
    with db.read() as conn:
        if "archive_state" in traffic_events.c:
            stmt = stmt.where(traffic_events.c.archive_state == ArchiveState.HOT)
        else:
            stmt = stmt.where(traffic_events.c.ts >= meta.archive_watermark_ms(db, conn))
        return conn.execute(stmt).scalar()


def report(env: Env, now_s: float | None = None) -> dict[str, Any]:
    """The capacity report as a JSON-serialisable dict (see the module docstring)."""
    now_s = clock.now_s() if now_s is None else now_s
    cfg = env.config
    out: dict[str, Any] = {"generated_at": clock.iso(now_s), "dialect": env.DB.dialect, **sizes(env.DB)}
    out["capacity_bytes"] = cfg.monitor.capacity_bytes
    out["used_ratio"] = round(out["db_bytes"] / cfg.monitor.capacity_bytes, 6)
    earlier = _earlier_size(env.DB, now_s)
    growth = None
    if earlier is not None:
        growth = (out["db_bytes"] - earlier[1]) / ((now_s - earlier[0]) / DAY_S)
    out["growth_bytes_per_day"] = None if growth is None else round(growth)
    out["growth_7d_bytes"] = None if growth is None else round(growth * 7)
    left = cfg.monitor.capacity_bytes - out["db_bytes"]
    out["days_until_full"] = None if not growth or growth <= 0 else round(left / growth, 1)
    oldest = _oldest_unarchived_ms(env.DB)
    out["oldest_unarchived_at"] = None if oldest is None else clock.iso(oldest / 1000)
    out["oldest_unarchived_age_days"] = None if oldest is None else round((now_s - oldest / 1000) / DAY_S, 3)
    stats = env.QUEUE.stats()
    out["queue_depth"] = stats["pending"] + stats["in_flight"]
    out["dlq_depth"] = stats["dlq"]
    out["archive"] = _archive_totals(env.DB)
    out["archive_flagged"] = _archive_flagged(env.DB)
    out["alerts"] = alerts(out, cfg)
    return out


def alerts(r: dict[str, Any], cfg: Any) -> list[str]:
    """Every threshold the report crosses, one line each."""
    m = cfg.monitor
    found = []
    if r["used_ratio"] >= m.warn_ratio:
        found.append(f"capacity: {r['used_ratio']:.0%} of {m.capacity_bytes} bytes used (≥ {m.warn_ratio:.0%})")
    if r["days_until_full"] is not None and r["days_until_full"] < m.min_days_left:
        found.append(f"capacity: full in {r['days_until_full']} days (< {m.min_days_left})")
    limit_days = cfg.retention.detail_days + 1
    age = r["oldest_unarchived_age_days"]
    if age is not None and age > limit_days:
        found.append(f"archive_lag: oldest un-archived row is {age:.1f} days old (> {limit_days})")
    if r["queue_depth"] > m.max_queue_depth:
        found.append(f"queue: {r['queue_depth']} messages waiting (> {m.max_queue_depth})")
    if r["dlq_depth"] > m.max_dlq_depth:
        found.append(f"dlq: {r['dlq_depth']} dead letters (> {m.max_dlq_depth})")
    flagged = r.get("archive_flagged") or []
    if flagged:
        keys = ", ".join(flagged[:5]) + (", …" if len(flagged) > 5 else "")
        found.append(f"archive_corrupt: {len(flagged)} objects flagged corrupt/mismatch ({keys})")
    return found


@job("monitor")
def run(env: Env, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
    """The report is the result: the scheduler stores it in `job_runs.result`, where the
    next runs find the size history they compute growth from."""
    result = report(env)
    for alert in result["alerts"]:
        log.event("monitor_alert", logging.WARNING, alert=alert)
    return result
