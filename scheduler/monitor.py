"""The capacity and health report (the `monitor` job, 04:00; `edgepipe monitor`).

What an operator needs before the database fills or the pipeline falls behind: size of
the database and of each table, row counts, growth over the last 7 days and the projected
days until `[monitor] capacity_bytes` (10 GB by default, D1's limit), archive and clean
lag, queue depth and age, DLQ depth and growth, workers alive, each job's last slot,
archive totals, the archive objects flagged corrupt or mismatch (`archive_flagged`).

Every threshold crossed is an alert, named, with the figure that raised it: `alerts` has
one line each (`name: what, figure (limit)`), `raised` the same as objects
(`{"name", "value", "limit", "message"}`). The names: `capacity`, `archive_lag`,
`clean_lag`, `queue` (depth), `queue_age`, `dlq` (depth or growth over a day), `no_worker`,
`job_failed`, `job_missed`, `archive_corrupt`.

Sizes: on SQLite from the `dbstat` table when the library has it (else the whole file
from page counts); on PostgreSQL `pg_total_relation_size` of edgepipe's own tables (the
server may hold other schemas). Growth compares with the size stored in the result of an
earlier `monitor` run, the one closest to 7 days ago (at least 6 hours back).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline import clock, heartbeat, log, meta
from pipeline.cron import parse_table
from pipeline.env import Env
from pipeline.jobruns import JobStore, RunStatus
from pipeline.jobs import job
from pipeline.schema import (
    FLAGGED,
    NOT_IN_BUCKET,
    ArchiveState,
    ObjectStatus,
    archive_objects,
    job_runs,
    metadata,
    traffic_events,
)

DAY_S = 86400
MIN_GROWTH_SPAN_S = 6 * 3600
FAILED_RUN = (RunStatus.FAILED, RunStatus.ABANDONED)
# The rows archive objects still hold in the database (summed over the objects selected).
_HELD_ROWS = sa.func.coalesce(sa.func.sum(archive_objects.c.row_count - archive_objects.c.cleaned_rows), 0)


def sizes(db: Any) -> dict[str, Any]:
    tables = sorted(metadata.tables)
    total, per_table = db.sizes(tables)
    with db.read() as conn:
        existing = set(sa.inspect(conn).get_table_names())
        rows = {t: int(conn.execute(sa.select(sa.func.count()).select_from(metadata.tables[t])).scalar_one())
                for t in tables if t in existing}  # fmt: skip
    table_bytes = None if per_table is None else {t: per_table.get(t, 0) for t in tables if t in existing}
    return {"db_bytes": total, "table_bytes": table_bytes, "rows": rows}


def _earlier(db: Any, now_s: float, key: str, days: float) -> tuple[float, int] | None:
    """(time, figure `key`) of the stored monitor result closest to `days` days before
    `now_s` (at least 6 hours back, at most a day more than `days`)."""
    stmt = (
        sa.select(job_runs.c.finished_at, job_runs.c.result)
        .where(
            job_runs.c.job == "monitor",
            job_runs.c.status == "succeeded",
            job_runs.c.finished_at <= now_s - MIN_GROWTH_SPAN_S,
        )
        .where(job_runs.c.finished_at >= now_s - (days + 1) * DAY_S)
        .order_by(sa.func.abs(job_runs.c.finished_at - (now_s - days * DAY_S)))
        .limit(1)
    )
    with db.read() as conn:
        row = conn.execute(stmt).first()
    if row is None or not row.result:
        return None
    figure = orjson.loads(row.result).get(key)
    return None if figure is None else (row.finished_at, int(figure))


def _per_day(now_value: int, earlier: tuple[float, int] | None, now_s: float) -> float | None:
    if earlier is None:
        return None
    return (now_value - earlier[1]) / ((now_s - earlier[0]) / DAY_S)


def _archive_totals(db: Any) -> dict[str, Any]:
    table = metadata.tables.get("archive_objects")
    if table is None or not {"row_count", "size_bytes"} <= set(table.c.keys()):
        return {"available": False}
    try:
        with db.read() as conn:
            objects, rows, size = conn.execute(
                sa.select(sa.func.count(), sa.func.sum(table.c.row_count), sa.func.sum(table.c.size_bytes)).where(
                    table.c.status.not_in(NOT_IN_BUCKET)  # pending, replaced and expired objects are not in the bucket
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


def _lag_rows(db: Any, now_s: float, detail_days: int) -> tuple[int, int]:
    """(`archive_lag_rows`: hot rows older than the archive cutoff by more than a day,
    `clean_lag_rows`: rows of objects verified more than a day ago still in the database)."""
    too_old_ms = int((now_s - (detail_days + 1) * DAY_S) * 1000)
    with db.read() as conn:
        unarchived = conn.execute(
            sa.select(sa.func.count()).where(
                traffic_events.c.ts < too_old_ms, traffic_events.c.archive_state == ArchiveState.HOT
            )
        ).scalar_one()
        uncleaned = conn.execute(
            sa.select(_HELD_ROWS).where(
                archive_objects.c.status == ObjectStatus.VERIFIED, archive_objects.c.verified_at < now_s - DAY_S
            )
        ).scalar_one()
    return int(unarchived), int(uncleaned)


def _clean_incomplete(db: Any) -> int | None:
    """When the last clean run stopped before the end (its time budget spent): the rows
    verified objects still hold now; else None."""
    stmt = (
        sa.select(job_runs.c.result)
        .where(job_runs.c.job == "clean", job_runs.c.status == RunStatus.SUCCEEDED)
        .order_by(job_runs.c.finished_at.desc())
        .limit(1)
    )
    with db.read() as conn:
        result = conn.execute(stmt).scalar()
        if orjson.loads(result or "{}").get("complete", True):
            return None
        verified = archive_objects.c.status == ObjectStatus.VERIFIED
        return int(conn.execute(sa.select(_HELD_ROWS).where(verified)).scalar_one())


def _jobs(env: Env, now_s: float) -> dict[str, dict[str, Any]]:
    """Each scheduled job's latest cron slot since the deployment started (`edgepipe init`
    records when; a database without that record is not judged) and how it went: the last
    attempt made for it or after it (runs by hand, e.g. from an external cron, count) is
    `succeeded`, `running` or `failed` (failed, or its worker died); with no attempt it is
    `pending` within `misfire_grace`, then `missed`."""
    cfg = env.config.schedule
    with env.DB.read() as conn:
        started = meta.get(conn, meta.DEPLOYMENT_START)
    if not started:
        return {}
    since = clock.parse_time(started)
    now = datetime.fromtimestamp(now_s, UTC)
    runs = JobStore(env.DB).runs(now_s - 8 * DAY_S)
    out: dict[str, dict[str, Any]] = {}
    for spec in parse_table(cfg.jobs, cfg.timezone):
        slot = spec.latest_fire(now, timedelta(days=8))
        if slot is None or slot.timestamp() < since:
            continue
        attempts = sorted((r.scheduled_for, r.attempt, r.status) for r in runs.get(spec.name, ())
                          if r.scheduled_for >= slot.timestamp() and r.status != RunStatus.DRY_RUN)  # fmt: skip
        if attempts:
            status = "failed" if attempts[-1][2] in FAILED_RUN else str(attempts[-1][2])
        else:
            status = "pending" if now_s - slot.timestamp() <= cfg.misfire_grace else "missed"
        out[spec.name] = {"slot": clock.iso(slot.timestamp()), "status": status, "attempts": len(attempts)}
    return out


def report(env: Env, now_s: float | None = None) -> dict[str, Any]:
    """The capacity and health report as a JSON-serialisable dict (see the module docstring)."""
    now_s = clock.now_s() if now_s is None else now_s
    cfg = env.config
    out: dict[str, Any] = {"generated_at": clock.iso(now_s), "dialect": env.DB.dialect, **sizes(env.DB)}
    out["capacity_bytes"] = cfg.monitor.capacity_bytes
    out["used_ratio"] = round(out["db_bytes"] / cfg.monitor.capacity_bytes, 6)
    growth = _per_day(out["db_bytes"], _earlier(env.DB, now_s, "db_bytes", 7), now_s)
    out["growth_bytes_per_day"] = None if growth is None else round(growth)
    out["growth_7d_bytes"] = None if growth is None else round(growth * 7)
    left = cfg.monitor.capacity_bytes - out["db_bytes"]
    out["days_until_full"] = None if not growth or growth <= 0 else round(left / growth, 1)
    oldest = _oldest_unarchived_ms(env.DB)
    out["oldest_unarchived_at"] = None if oldest is None else clock.iso(oldest / 1000)
    out["oldest_unarchived_age_days"] = None if oldest is None else round((now_s - oldest / 1000) / DAY_S, 3)
    out["archive_lag_rows"], out["clean_lag_rows"] = _lag_rows(env.DB, now_s, cfg.retention.detail_days)
    out["clean_incomplete_rows"] = _clean_incomplete(env.DB)
    stats = env.QUEUE.stats()
    out["queue_depth"] = stats["pending"] + stats["in_flight"]
    out["queue_oldest_age_s"] = round(env.QUEUE.oldest_age_s(), 1)
    out["dlq_depth"] = stats["dlq"]
    out["rejected_total"] = sum(env.QUEUE.rejected_totals().values())
    dlq_growth = _per_day(out["rejected_total"], _earlier(env.DB, now_s, "rejected_total", 1), now_s)
    out["dlq_growth_per_day"] = None if dlq_growth is None else round(dlq_growth, 1)
    w = cfg.worker
    workers = heartbeat.status(env.DB, now_s=now_s, dead_after=w.dead_after, forget_after=w.forget_after)["workers"]
    out["workers_seen"] = len(workers)
    out["workers_alive"] = sum(x["verdict"] not in ("dead", "stopped") for x in workers)
    out["jobs"] = _jobs(env, now_s)
    out["archive"] = _archive_totals(env.DB)
    out["archive_flagged"] = _archive_flagged(env.DB)
    out["raised"] = raised(out, cfg)
    out["alerts"] = [f"{a['name']}: {a['message']}" for a in out["raised"]]
    return out


def raised(r: dict[str, Any], cfg: Any) -> list[dict[str, Any]]:
    """Every threshold the report crosses: name, the figure, its limit, one line."""
    m = cfg.monitor
    found: list[dict[str, Any]] = []

    def alert(name: str, value: Any, limit: Any, message: str) -> None:
        found.append({"name": name, "value": value, "limit": limit, "message": message})

    if r["used_ratio"] >= m.warn_ratio:
        alert("capacity", r["used_ratio"], m.warn_ratio,
              f"{r['used_ratio']:.0%} of {m.capacity_bytes} bytes used (≥ {m.warn_ratio:.0%})")  # fmt: skip
    if r["days_until_full"] is not None and r["days_until_full"] < m.min_days_left:
        alert("capacity", r["days_until_full"], m.min_days_left,
              f"full in {r['days_until_full']} days (< {m.min_days_left})")  # fmt: skip
    limit_days = cfg.retention.detail_days + 1
    age = r["oldest_unarchived_age_days"]
    if r["archive_lag_rows"]:
        alert("archive_lag", r["archive_lag_rows"], 0,
              f"{r['archive_lag_rows']} rows older than {limit_days} days not archived "
              f"(the oldest {age:.1f} days old)")  # fmt: skip
    late_clean = max(r["clean_lag_rows"], r["clean_incomplete_rows"] or 0)
    if late_clean:
        why = "verified more than a day ago" if r["clean_lag_rows"] else "left by a clean run out of time"
        alert("clean_lag", late_clean, 0, f"{late_clean} archived rows still in the database ({why})")
    if r["queue_depth"] > m.max_queue_depth:
        alert("queue", r["queue_depth"], m.max_queue_depth,
              f"{r['queue_depth']} messages waiting (> {m.max_queue_depth})")  # fmt: skip
    if r["queue_oldest_age_s"] > m.max_queue_age_s:
        alert("queue_age", r["queue_oldest_age_s"], m.max_queue_age_s,
              f"the oldest message has waited {r['queue_oldest_age_s']:.0f} s (> {m.max_queue_age_s:.0f})")  # fmt: skip
    if r["dlq_depth"] > m.max_dlq_depth:
        alert("dlq", r["dlq_depth"], m.max_dlq_depth, f"{r['dlq_depth']} dead letters (> {m.max_dlq_depth})")
    growth = r["dlq_growth_per_day"]
    if growth is not None and growth > m.max_dlq_growth:
        alert("dlq", growth, m.max_dlq_growth, f"{growth:.0f} dead letters a day (> {m.max_dlq_growth})")
    if r["workers_seen"] and not r["workers_alive"]:
        alert("no_worker", 0, 1, f"none of the {r['workers_seen']} workers seen lately is alive (edgepipe status)")
    for name, j in r["jobs"].items():
        if j["status"] == "failed":
            alert("job_failed", name, j["slot"], f"{name} failed its {j['slot']} slot ({j['attempts']} attempts)")
        elif j["status"] == "missed":
            alert("job_missed", name, j["slot"], f"{name} never ran for its {j['slot']} slot")
    flagged = r.get("archive_flagged") or []
    if flagged:
        keys = ", ".join(flagged[:5]) + (", …" if len(flagged) > 5 else "")
        alert("archive_corrupt", len(flagged), 0, f"{len(flagged)} objects flagged corrupt/mismatch ({keys})")
    return found


@job("monitor")
def run(env: Env, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
    """The report is the result: the scheduler stores it in `job_runs.result`, where the
    next runs find the size history they compute growth from."""
    result = report(env)
    for alert in result["raised"]:
        log.event("monitor_alert", logging.WARNING, alert=alert["name"], value=alert["value"], detail=alert["message"])
    return result
