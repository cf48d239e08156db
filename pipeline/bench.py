"""Benchmarks behind `edgepipe bench …`. Each prints a ratio against a reference measured
in the same run, because the machine is shared and absolute times drift."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline import clock, sample
from pipeline.config import Config

RAW_CHUNK = 1000
SEND_CHUNK = 5000


def _raw_sqlite(rows: list[tuple[Any, ...]], path: Path) -> tuple[float, float]:
    """The raw limit: stdlib executemany into a bare integer-keyed table, 1000 rows per
    transaction, WAL, synchronous=NORMAL. Returns (wall seconds, CPU seconds)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(
        "CREATE TABLE raw (seq INTEGER PRIMARY KEY, ts INTEGER, id TEXT, method TEXT, path TEXT,"
        " status INTEGER, rt REAL, host TEXT, colo TEXT, bytes INTEGER)"
    )
    sql = "INSERT INTO raw (ts, id, method, path, status, rt, host, colo, bytes) VALUES (?,?,?,?,?,?,?,?,?)"
    started, cpu = clock.monotonic(), time.process_time()
    for i in range(0, len(rows), RAW_CHUNK):
        con.execute("BEGIN")
        con.executemany(sql, rows[i : i + RAW_CHUNK])
        con.execute("COMMIT")
    elapsed, cpu = clock.monotonic() - started, time.process_time() - cpu
    con.close()
    return elapsed, cpu


@contextlib.contextmanager
def scratch_db(url: str | None, workdir: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file in `workdir`, or a throwaway schema on the
    PostgreSQL server at `url` (dropped afterwards)."""
    if url is None or url.startswith("sqlite"):
        yield url or f"sqlite:///{workdir / 'edgepipe.db'}"
        return
    schema = f"edgepipe_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def _drain(worker: Any) -> tuple[float, float, list[float], int]:
    """Run the consumer until the queue is empty: (wall seconds, CPU seconds, per-batch ms,
    events inserted)."""
    latencies: list[float] = []
    inserted = 0
    started, cpu = clock.monotonic(), time.process_time()
    while (result := worker.step(wait=0.0)) is not None:
        if not result.ok:
            raise RuntimeError(f"batch failed during the benchmark: {result.error}")
        latencies.append(result.ms)
        inserted += result.report.inserted
    return clock.monotonic() - started, time.process_time() - cpu, latencies, inserted


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return (
        round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 2) if len(values) > 1 else values[0]
    )


def bench_consume(
    n: int = 1_000_000,
    batch_size: int = 100,
    db_url: str | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    snapshots: bool = False,
) -> dict[str, Any]:
    from consumers.traffic import TrafficConsumer
    from pipeline import log, migrate
    from pipeline.env import open_env
    from pipeline.worker import Worker

    log.setup("WARNING")
    progress(f"generating {n:,} events")
    events = list(sample.events(n, days=5, n_paths=2000, seed=7))
    rows = [
        (e["ts"], e["id"], e["method"], e["path"], e["status"], e["response_time_ms"], e["host"], e["colo"], e["bytes"])
        for e in events
    ]
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        progress("raw SQLite reference")
        raw_s, raw_cpu = _raw_sqlite(rows, work / "raw.db")
        del rows
        with scratch_db(db_url, work) as url:
            cfg = Config().replace(
                bindings={"db": url, "archive": f"file://{work / 'archive'}"},
                consumer={"max_batch_size": batch_size, "max_batch_timeout": 0, "snapshot_every_batches": 0},
            )
            env = open_env(cfg, check_schema=False)
            migrate.upgrade(env.DB)
            progress("enqueue")
            started = clock.monotonic()
            for i in range(0, n, SEND_CHUNK):
                env.QUEUE.send_batch(events[i : i + SEND_CHUNK])
            enqueue_s = clock.monotonic() - started
            worker = Worker(env, TrafficConsumer(cfg).queue)
            progress("consume")
            consume_s, consume_cpu, latencies, inserted = _drain(worker)
            progress("consume again (all duplicates)")
            for i in range(0, n, SEND_CHUNK):
                env.QUEUE.send_batch(events[i : i + SEND_CHUNK])
            dup_s, dup_cpu, _, dup_inserted = _drain(worker)
            env.close()
        snap = None
        if snapshots:
            from pipeline.bench_snapshot import consume_with_snapshots

            progress("snapshot overhead: fresh databases, refresh off / every 10 batches, alternating")
            snap = consume_with_snapshots(events, batch_size, db_url, work / "snapshots", every=10)
    raw, consumer, dup = n / raw_s, n / consume_s, n / dup_s
    extra = {}
    if snap is not None:
        extra = snap
    return extra | {
        "events": n,
        "batch_size": batch_size,
        "db": "sqlite" if db_url is None or db_url.startswith("sqlite") else "postgresql",
        "raw_events_per_s": round(raw),
        "enqueue_events_per_s": round(n / enqueue_s),
        "consumer_events_per_s": round(consumer),
        "ratio": round(consumer / raw, 4),
        "batch_p50_ms": _pct(latencies, 50),
        "batch_p99_ms": _pct(latencies, 99),
        "duplicate_events_per_s": round(dup),
        "duplicate_ratio": round(dup / raw, 4),
        # The same ratios from process CPU time: steadier on a shared machine.
        "cpu_ratio": round(raw_cpu / consume_cpu, 4),
        "cpu_duplicate_ratio": round(raw_cpu / dup_cpu, 4),
        "inserted": inserted,
        "duplicates_inserted": dup_inserted,
    }
