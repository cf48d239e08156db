"""`edgepipe bench scale`: events/s with 1, 2, 4 … `edgepipe worker` processes on one
database and one queue.

For each worker count, in the order given: a fresh database (a SQLite file, or a throwaway
schema on the PostgreSQL server at `db_url`), the queue at `queue_url` (`db`: that
database's own table; an SQS queue or a Redis stream must start empty, and the run leaves
it empty), N generated events enqueued one per message, then that many real worker
processes (`edgepipe worker --no-scheduler`) started together on the full queue.

The clock runs from the first batch settled (the queue's depth first drops) to the last
(the queue is empty): process start-up is not counted, and the queue's depth (a cheap
reading on every backend) is what is polled, not the database. Each worker's CPU seconds
(user + system, from /proc) are read over the same span, and on PostgreSQL the WAL
written per event. A run is `exact` when the stored events and the hourly aggregates'
request and byte sums equal the events sent. Speed-ups are against the first worker count
of the same run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline import clock, log, migrate, sample
from pipeline.bench.common import Progress, db_kind, quiet, send_events
from pipeline.bench.scratch import scratch_db
from pipeline.config import Config
from pipeline.env import Env, open_env
from pipeline.schema import path_stats_hourly, traffic_events

POLL_S = 0.05
DEADLINE_S = 3600.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def depth(env: Env, n: int) -> int:
    return env.QUEUE.depth_estimate(n)[0]


def exact(env: Env, events: list[dict[str, Any]]) -> bool:
    with env.DB.read() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(traffic_events)).scalar_one()
        requests, nbytes = conn.execute(
            sa.select(sa.func.sum(path_stats_hourly.c.requests), sa.func.sum(path_stats_hourly.c.bytes_sum))
        ).one()
    return (stored, requests, nbytes) == (len(events), len(events), sum(e["bytes"] for e in events))


def wal_lsn(env: Env) -> str | None:
    """PostgreSQL's current WAL position (None on SQLite): WAL bytes per event are one of the
    figures that say where the bottleneck moves with more workers (docs/scaling.md)."""
    if env.DB.dialect != "postgresql":
        return None
    with env.DB.read() as conn:
        return str(conn.exec_driver_sql("SELECT pg_current_wal_lsn()").scalar_one())


def wal_bytes(env: Env, start: str | None, end: str | None) -> int | None:
    if start is None or end is None:
        return None
    with env.DB.read() as conn:
        return int(conn.exec_driver_sql(f"SELECT pg_wal_lsn_diff('{end}', '{start}')").scalar_one())


def run_workers(
    k: int, events: list[dict[str, Any]], db: str, queue: str, batch_size: int, work: Path, progress: Progress
) -> dict[str, Any]:
    """One measurement: `k` worker processes drain `events` from a fresh database."""
    cfg = Config().replace(
        bindings={"db": db, "queue": queue, "archive": f"file://{work / 'archive'}"},
        consumer={"max_batch_size": batch_size, "max_batch_timeout": 0.05, "snapshot_every_batches": 0},
    )
    env = open_env(cfg, check_schema=False)
    try:
        migrate.upgrade(env.DB)
        env.QUEUE.ensure()
        n = len(events)
        if env.QUEUE.depth():
            raise RuntimeError(f"the queue {queue!r} is not empty: the benchmark needs a queue of its own")
        progress(f"{k} worker(s): enqueue {n:,} events")
        send_events(env.QUEUE, events)
        environ = {key: v for key, v in os.environ.items() if not key.startswith("EDGEPIPE_")} | {
            "EDGEPIPE_BINDINGS__DB": db,
            "EDGEPIPE_BINDINGS__QUEUE": queue,
            "EDGEPIPE_BINDINGS__ARCHIVE": f"file://{work / 'archive'}",
            "EDGEPIPE_CLEANER__STATS_FILE": str(work / "stats.json"),
            "EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": str(batch_size),
            "EDGEPIPE_CONSUMER__MAX_BATCH_TIMEOUT": "0.05",
            "EDGEPIPE_CONSUMER__SNAPSHOT_EVERY_BATCHES": "0",
        }
        command = [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "worker", "--no-scheduler"]
        procs = [
            subprocess.Popen(command, cwd=work, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(k)
        ]
        try:
            progress(f"{k} worker(s): consume")
            deadline = clock.monotonic() + DEADLINE_S
            while (left := depth(env, n)) >= n:  # start-up: read without pausing, to catch the first batch
                _check(procs, deadline)
            t0, cpu0, taken0 = clock.monotonic(), [cpu_seconds(p.pid) for p in procs], n - left
            lsn0 = wal_lsn(env)
            while depth(env, n) > 0:
                _check(procs, deadline)
                clock.sleep(POLL_S)
            t1, cpu1 = clock.monotonic(), [cpu_seconds(p.pid) for p in procs]
            lsn1 = wal_lsn(env)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.communicate(timeout=60)
        counted = n - taken0
        if counted <= 0 or t1 <= t0:
            raise RuntimeError("the workers drained the queue between two readings: use more --events")
        return {
            "workers": k,
            "seconds": round(t1 - t0, 3),
            "events_per_s": round(counted / (t1 - t0)),
            "cpu_s_per_1000_events": round((sum(cpu1) - sum(cpu0)) / counted * 1000, 4),
            "exact": exact(env, events),
        } | ({"wal_bytes_per_event": round(w / counted)} if (w := wal_bytes(env, lsn0, lsn1)) is not None else {})
    finally:
        env.close()


def _check(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    for p in procs:
        if p.poll() is not None:
            err = (p.stderr.read() if p.stderr else b"").decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"a worker exited with {p.returncode}: {err[-1] if err else 'no output'}")
    if clock.monotonic() > deadline:
        raise RuntimeError("the workers did not drain the queue in time")


def run(
    workers: list[int],
    db_url: str | None = None,
    queue_url: str = "db",
    n: int = 200_000,
    batch_size: int = 1000,
    progress: Progress = quiet,
) -> dict[str, Any]:
    log.setup("WARNING")
    progress(f"generating {n:,} events")
    events = list(sample.events(n, days=5, n_paths=2000, seed=11))
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        for k in workers:
            work = Path(tmp) / f"w{k}"
            work.mkdir()
            with scratch_db(db_url, work) as db:
                runs.append(run_workers(k, events, db, queue_url, batch_size, work, progress))
    first = runs[0]["events_per_s"]
    for r in runs:
        r["speedup"] = round(r["events_per_s"] / first, 3)
    return {
        "events": n,
        "batch_size": batch_size,
        "db": db_kind(db_url),
        "queue": queue_url.split(":", 1)[0],
        "runs": runs,
    }
