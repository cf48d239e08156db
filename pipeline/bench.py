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
SLICE_EVENTS = 20_000  # per turn of a race (see `race`)


class RawSqlite:
    """The raw limit: stdlib executemany into a bare integer-keyed table, 1000 rows per
    transaction, WAL, synchronous=NORMAL."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute(
            "CREATE TABLE raw (seq INTEGER PRIMARY KEY, ts INTEGER, id TEXT, method TEXT, path TEXT,"
            " status INTEGER, rt REAL, host TEXT, colo TEXT, bytes INTEGER)"
        )

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        sql = "INSERT INTO raw (ts, id, method, path, status, rt, host, colo, bytes) VALUES (?,?,?,?,?,?,?,?,?)"
        for i in range(0, len(rows), RAW_CHUNK):
            self.con.execute("BEGIN")
            self.con.executemany(sql, rows[i : i + RAW_CHUNK])
            self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()


class Meter:
    """Wall-clock and process CPU seconds, summed over the slices one side ran."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        wall, cpu = clock.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.wall += clock.monotonic() - wall
            self.cpu += time.process_time() - cpu


def consume_slice(worker: Any, n: int, latencies: list[float]) -> tuple[int, int]:
    """Run batches until `n` messages were consumed or the queue is empty: (messages,
    events inserted); each batch's latency is appended to `latencies`. A WAL checkpoint the
    slice asked of the DB binding's background thread is waited for before returning: it
    is the slice's work, and whatever runs next gets the disk alone."""
    messages = inserted = 0
    while messages < n and (result := worker.step(wait=0.0)) is not None:
        if not result.ok:
            raise RuntimeError(f"batch failed during the benchmark: {result.error}")
        latencies.append(result.ms)
        messages += result.messages
        inserted += result.report.inserted
    worker.env.DB.wait_checkpoints()
    return messages, inserted


def race(worker: Any, rows: list[tuple[Any, ...]], raw_path: Path) -> dict[str, Any]:
    """Drain the queue (one event per message, `rows` in queue order) through `worker` and
    insert the same rows raw into a fresh table, in alternating slices of `SLICE_EVENTS`:
    both sides see the same machine, whose speed drifts by tens of percent within a minute."""
    raw, raw_meter, meter = RawSqlite(raw_path), Meter(), Meter()
    latencies: list[float] = []
    done = inserted = 0
    try:
        while True:
            with meter():
                messages, new = consume_slice(worker, SLICE_EVENTS, latencies)
            inserted += new
            if not messages:
                break
            with raw_meter():
                raw.insert(rows[done : done + messages])
            done += messages
    finally:
        raw.close()
    if done != len(rows):
        raise RuntimeError(f"the consumer took {done:,} messages, {len(rows):,} were sent")
    return {"raw": raw_meter, "consumer": meter, "latencies": latencies, "inserted": inserted}


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
            progress("consume, alternating with the raw SQLite reference")
            first = race(worker, rows, work / "raw1.db")
            progress("consume again (all duplicates), alternating with the raw reference")
            for i in range(0, n, SEND_CHUNK):
                env.QUEUE.send_batch(events[i : i + SEND_CHUNK])
            second = race(worker, rows, work / "raw2.db")
            env.close()
        snap = None
        if snapshots:
            from pipeline.bench_snapshot import consume_with_snapshots

            progress("snapshot overhead: fresh databases, refresh off / every 10 batches, alternating")
            snap = consume_with_snapshots(events, batch_size, db_url, work / "snapshots", every=10)
    raw, raw2 = first["raw"], second["raw"]
    consumer, dup = n / first["consumer"].wall, n / second["consumer"].wall
    extra = {}
    if snap is not None:
        extra = snap
    return extra | {
        "events": n,
        "batch_size": batch_size,
        "db": "sqlite" if db_url is None or db_url.startswith("sqlite") else "postgresql",
        # Each pass races its own raw reference (a fresh table, the same rows).
        "raw_events_per_s": round(n / raw.wall),
        "raw_duplicate_pass_events_per_s": round(n / raw2.wall),
        "enqueue_events_per_s": round(n / enqueue_s),
        "consumer_events_per_s": round(consumer),
        "ratio": round(raw.wall / first["consumer"].wall, 4),
        "batch_p50_ms": _pct(first["latencies"], 50),
        "batch_p99_ms": _pct(first["latencies"], 99),
        "duplicate_events_per_s": round(dup),
        "duplicate_ratio": round(raw2.wall / second["consumer"].wall, 4),
        # The same ratios from process CPU time.
        "cpu_ratio": round(raw.cpu / first["consumer"].cpu, 4),
        "cpu_duplicate_ratio": round(raw2.cpu / second["consumer"].cpu, 4),
        "inserted": first["inserted"],
        "duplicates_inserted": second["inserted"],
    }
