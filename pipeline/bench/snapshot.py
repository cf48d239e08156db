"""Snapshot benchmarks: `edgepipe bench snapshot` and `edgepipe bench consume --snapshots`.

`run` (`bench snapshot`): a refresh must read only its window's rows, so its cost must not
grow with history. One database gets 7 days of hourly aggregates for `paths` paths;
refreshes are timed; then 83 older days are added (90 in all) and the same refreshes are
timed again, in the same run. The ratio 90 d / 7 d stays near 1 when the `hour` range
drives the read, and the query plan is reported to show it.

`consume_with_snapshots`: the consumer's throughput with snapshot refreshes off and strictly
every N batches, two workers on fresh databases taking turns in slices, in the same run.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline import clock, log, migrate
from pipeline.bench.common import (
    SLICE_EVENTS,
    Meter,
    Progress,
    consume_slice,
    db_kind,
    percentile,
    quiet,
    send_events,
)
from pipeline.bench.scratch import scratch_db
from pipeline.cli.compose import refresh_snapshot, snapshot_refresher, snapshot_stats, traffic_handler
from pipeline.config import Config
from pipeline.env import Env, open_env
from pipeline.queries import top_paths_statement
from pipeline.schema import BUCKET_COLUMNS, STATUS_COLUMNS, path_stats_hourly
from pipeline.worker import Context, SideWork, Worker

HOUR = 3600
INSERT_CHUNK = 20_000


def _rows(hours: range, paths: list[str], rng: random.Random) -> list[dict[str, Any]]:
    out = []
    zero = dict.fromkeys(BUCKET_COLUMNS, 0)
    for hour in hours:
        for rank, path in enumerate(paths):
            n = max(1, int(5000 / (rank + 1)) + rng.randint(0, 3))
            bucket = BUCKET_COLUMNS[rng.randint(3, 9)]
            out.append(
                {
                    "hour": hour, "host": "", "path": path, "method": "GET", "requests": n,
                    **dict.fromkeys(STATUS_COLUMNS, 0), "status_2xx": n, "bytes_sum": n * 512,
                    "rt_sum_ms": n * 40.0, "rt_min_ms": 1.0, "rt_max_ms": 900.0, **zero, bucket: n,
                }
            )  # fmt: skip
    return out


def _fill(env: Env, hours: range, paths: list[str], rng: random.Random, progress: Progress) -> int:
    """Insert one row per (hour, path); returns the number of rows."""
    total = 0
    step = max(1, INSERT_CHUNK // len(paths))
    for i in range(0, len(hours), step):
        rows = _rows(hours[i : i + step], paths, rng)
        with env.DB.transaction() as conn:
            conn.execute(path_stats_hourly.insert(), rows)
        total += len(rows)
    progress(f"{total:,} hourly rows written")
    return total


def _time_refresh(env: Env, now_s: float, repeat: int) -> float:
    """Median seconds of `repeat` refreshes (after one warm-up)."""
    refresh_snapshot(env, now_s)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        refresh_snapshot(env, now_s)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def query_plan(env: Env, now_s: float) -> list[str]:
    """The database's plan for the snapshot query, one line per step."""
    cfg = env.config.snapshots
    stmt = top_paths_statement(cfg.window_hours, cfg.top_n, now_s)
    sql = str(stmt.compile(env.DB.engine, compile_kwargs={"literal_binds": True}))
    with env.DB.read() as conn:
        if env.DB.dialect == "sqlite":
            return [r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
        return [r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}")]


def run(paths: int = 2000, db_url: str | None = None, repeat: int = 5, progress: Progress = quiet) -> dict[str, Any]:
    """Refresh times over 7 and over 90 days of hourly rows for `paths` paths, their ratio
    and the query plan. Returns the report."""
    log.setup("WARNING")
    rng = random.Random(11)
    names = [f"/api/v1/resource{i}/items" for i in range(paths)]
    now_s = float(clock.now_s() // HOUR * HOUR + 1800)
    last = int(now_s) // HOUR * HOUR
    recent = range(last - (7 * 24 - 1) * HOUR, last + HOUR, HOUR)
    older = range(last - (90 * 24 - 1) * HOUR, recent.start, HOUR)
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp, scratch_db(db_url, Path(tmp)) as url:
        cfg = Config().replace(bindings={"db": url, "archive": f"file://{tmp}/archive"})
        env = open_env(cfg, check_schema=False)
        try:
            migrate.upgrade(env.DB)
            progress("7 days of aggregates")
            rows_7 = _fill(env, recent, names, rng, progress)
            t7 = _time_refresh(env, now_s, repeat)
            progress("83 older days (90 in all)")
            rows_90 = rows_7 + _fill(env, older, names, rng, progress)
            if env.DB.dialect == "postgresql":
                with env.DB.transaction() as conn:
                    conn.exec_driver_sql("ANALYZE path_stats_hourly")
            t90 = _time_refresh(env, now_s, repeat)
            plan = query_plan(env, now_s)
        finally:
            env.close()
    return {
        "db": db_kind(url),
        "paths": paths,
        "window_hours": cfg.snapshots.window_hours,
        "top_n": cfg.snapshots.top_n,
        "rows_7d": rows_7,
        "rows_90d": rows_90,
        "refresh_7d_ms": round(t7 * 1000, 2),
        "refresh_90d_ms": round(t90 * 1000, 2),
        "ratio": round(t90 / t7, 3),
        "plan": plan,
        "plan_uses_hour_range": any(("hour>" in p.replace(" ", "") or "hour >=" in p) for p in plan),
    }


def _worker(stack: contextlib.ExitStack, events: list[dict[str, Any]], batch_size: int, db_url: str | None,
            work: Path, every: int) -> tuple[Worker, SideWork | None]:  # fmt: skip
    """A worker on a fresh database holding `events`, refreshing every `every` batches (0:
    never; strictly: `min_interval_s = 0`, so only a refresh still running skips one), and
    its snapshot refresher (None when it has none), as `consumer_worker` composes them."""
    work.mkdir(parents=True, exist_ok=True)
    url = stack.enter_context(scratch_db(db_url, work))
    cfg = Config().replace(
        bindings={"db": url, "archive": f"file://{work / 'archive'}"},
        consumer={"max_batch_size": batch_size, "max_batch_timeout": 0, "snapshot_every_batches": every},
        snapshots={"min_interval_s": 0},
    )
    env = open_env(cfg, check_schema=False)
    stack.callback(env.close)
    migrate.upgrade(env.DB)
    send_events(env.QUEUE, events)
    ctx = Context()
    refresher = snapshot_refresher(env, ctx)
    worker = Worker(env, traffic_handler(env), ctx=ctx, side=refresher)
    stack.callback(worker.close)
    return worker, refresher


def consume_with_snapshots(
    events: list[dict[str, Any]], batch_size: int, db_url: str | None, work: Path, every: int = 10
) -> dict[str, Any]:
    """The consumer's throughput with refreshes off and every `every` batches: two workers
    on fresh databases holding the same events, run in alternating slices (see
    `pipeline.bench.consume.race`). A refresh still running when the refreshing worker's
    slice ends is waited for inside that slice, so its whole cost is counted on its side."""
    with contextlib.ExitStack() as stack:
        off, _ = _worker(stack, events, batch_size, db_url, work / "off", 0)
        on, refresher = _worker(stack, events, batch_size, db_url, work / "on", every)
        meters = {"off": Meter(), "on": Meter()}
        latencies: dict[str, list[float]] = {"off": [], "on": []}
        turn = 0
        while True:
            moved = 0
            for side, worker in (("off", off), ("on", on))[:: 1 if turn % 2 else -1]:
                with meters[side]():
                    messages, _inserted = consume_slice(worker, SLICE_EVENTS, latencies[side])
                    worker.drain()
                moved += messages
            turn += 1
            if not moved:
                break
    n = len(events)
    refreshes, builder_cpu = snapshot_stats(refresher)  # builder_cpu: the helper process's
    return {
        "snapshot_every_batches": every,
        "snapshot_events_per_s": round(n / meters["on"].wall),
        "snapshot_overhead": round(1 - meters["off"].wall / meters["on"].wall, 4),
        "snapshot_cpu_overhead": round((meters["on"].cpu + builder_cpu) / meters["off"].cpu - 1, 4),
        "snapshot_builder_cpu_s": round(builder_cpu, 2),
        "snapshot_batch_p99_ms": percentile(latencies["on"], 99),
        "snapshot_refreshes": refreshes,
    }
