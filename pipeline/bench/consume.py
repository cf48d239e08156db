"""`edgepipe bench consume`: the consumer's throughput against the raw SQLite insert limit.

N generated events are enqueued one per message (timed apart), then drained through
edgepipe's worker and traffic consumer, then enqueued and drained again (a pass of nothing
but duplicates). Each pass races its own reference, stdlib `executemany` of the same rows
into a fresh bare table (`RawSqlite`), in alternating slices (`race`): the machine is
shared and its speed drifts within a minute, so both sides must see the same machine.
With `snapshots`, the snapshot refresh overhead is measured too (`pipeline.bench.snapshot`).
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from pipeline import clock, log, migrate, sample
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
from pipeline.bench.snapshot import consume_with_snapshots
from pipeline.cli.compose import traffic_handler
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.worker import Worker

RAW_CHUNK = 1000
RAW_FIELDS = ("ts", "id", "method", "path", "status", "response_time_ms", "host", "colo", "bytes")


def raw_rows(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The events as the reference inserts them: tuples in `RAW_FIELDS` order."""
    return [tuple(e[f] for f in RAW_FIELDS) for e in events]


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


def race(worker: Worker, rows: list[tuple[Any, ...]], raw_path: Path) -> dict[str, Any]:
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


def run(
    n: int = 1_000_000,
    batch_size: int = 100,
    db_url: str | None = None,
    progress: Progress = quiet,
    snapshots: bool = False,
) -> dict[str, Any]:
    """Consume `n` events twice (new, then all duplicates), each pass raced against the raw
    limit; with `snapshots`, also the snapshot refresh overhead. Returns the report."""
    log.setup("WARNING")
    progress(f"generating {n:,} events")
    events = list(sample.events(n, days=5, n_paths=2000, seed=7))
    rows = raw_rows(events)
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
            send_events(env.QUEUE, events)
            enqueue_s = clock.monotonic() - started
            worker = Worker(env, traffic_handler(env), pipelined=True)  # as `edgepipe worker` runs it
            progress("consume, alternating with the raw SQLite reference")
            first = race(worker, rows, work / "raw1.db")
            progress("consume again (all duplicates), alternating with the raw reference")
            send_events(env.QUEUE, events)
            second = race(worker, rows, work / "raw2.db")
            env.close()
        snap: dict[str, Any] = {}
        if snapshots:
            progress("snapshot overhead: fresh databases, refresh off / every 10 batches, alternating")
            snap = consume_with_snapshots(events, batch_size, db_url, work / "snapshots", every=10)
    raw, raw2 = first["raw"], second["raw"]
    consumer, dup = n / first["consumer"].wall, n / second["consumer"].wall
    return snap | {
        "events": n,
        "batch_size": batch_size,
        "db": db_kind(db_url),
        # Each pass races its own raw reference (a fresh table, the same rows).
        "raw_events_per_s": round(n / raw.wall),
        "raw_duplicate_pass_events_per_s": round(n / raw2.wall),
        "enqueue_events_per_s": round(n / enqueue_s),
        "consumer_events_per_s": round(consumer),
        "ratio": round(raw.wall / first["consumer"].wall, 4),
        "batch_p50_ms": percentile(first["latencies"], 50),
        "batch_p99_ms": percentile(first["latencies"], 99),
        "duplicate_events_per_s": round(dup),
        "duplicate_ratio": round(raw2.wall / second["consumer"].wall, 4),
        # The same ratios from process CPU time.
        "cpu_ratio": round(raw.cpu / first["consumer"].cpu, 4),
        "cpu_duplicate_ratio": round(raw2.cpu / second["consumer"].cpu, 4),
        "inserted": first["inserted"],
        "duplicates_inserted": second["inserted"],
    }
