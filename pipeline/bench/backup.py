"""`edgepipe bench backup`: how fast a backup runs, and what it costs the consumer beside it.

N detail rows with their hourly aggregates are generated into a SQLite database (the
archive benchmark's generator; ~250 MB at a million rows). Then, in the same run:

* **backup alone**: the `backup` job (SQLite's online backup API into a temp file, gzip,
  sha256, a `file://` ARCHIVE binding, the read-back check, the manifest, retention)
  against its reference, the plainest way to the same copy: stdlib `Connection.backup` of
  the file in one step, then a gzip of the copy at the backup's level (`LEVEL`). They
  alternate `ROUNDS` times; the round with the median ratio is reported.
* **the consumer beside a backup**: a worker with the traffic consumer drains a backlog
  from a queue kept in a second SQLite file (as an external queue, SQS or Redis, would be:
  the backlog is not part of the copy) into the generated database, in three slices: a
  tenth of the backlog, then as much as it takes while the `backup` job runs in a thread
  of the same process (as the scheduler runs it inside `edgepipe worker`; at most eight
  tenths: `backup_outlasted` says when the backup was still running at their end), then
  another tenth. `consumer_ratio` is the events/s during the backup over the events/s of
  the two other slices together; the longest batch of each slice says how long a batch
  waited.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sqlite3
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import clock, log, migrate, sample, totals
from pipeline.bench.archive import generate
from pipeline.bench.common import SEND_CHUNK, Meter, Progress, percentile, quiet
from pipeline.bindings.db import Database
from pipeline.bindings.queue_sql import SqlQueue
from pipeline.cli.compose import register_jobs, traffic_handler
from pipeline.config import Config
from pipeline.env import Env, open_env, queue_settings
from pipeline.worker import Worker

ROUNDS = 3
LEVEL = 1  # the backup's gzip level (archiver.backup.COMPRESS_LEVEL; a test keeps them equal)
CHUNK = 1 << 20


class ExternalQueue(SqlQueue):
    """The SQL queue in a database of its own, settled after the consumer's commit like an
    external queue."""

    shares_transaction = False


def _config(work: Path, batch_size: int) -> Config:
    return Config().replace(
        bindings={"db": f"sqlite:///{work / 'bench.db'}", "archive": f"file://{work / 'archive'}"},
        consumer={"max_batch_size": batch_size, "max_batch_timeout": 0, "snapshot_every_batches": 0},
        cleaner={"stats_file": str(work / "stats.json")},
    )


def _backup_job(env: Env) -> dict[str, Any]:
    """The `backup` job, now; the backups it wrote are removed afterwards (disk space)."""
    result = register_jobs()["backup"](env, datetime.now(UTC), False)
    shutil.rmtree(Path(env.config.bindings.archive.removeprefix("file://")) / "backups", ignore_errors=True)
    return result


def reference(db_path: Path, work: Path) -> dict[str, Any]:
    """A one-step stdlib backup of the file, then gzip of the copy (streamed, `LEVEL`)."""
    copy, out = work / "reference.db", work / "reference.db.gz"
    src, dst = sqlite3.connect(db_path), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    zipper, raw = zlib.compressobj(LEVEL, zlib.DEFLATED, 31), 0
    with copy.open("rb") as f, out.open("wb") as w:
        while chunk := f.read(CHUNK):
            raw += len(chunk)
            w.write(zipper.compress(chunk))
        w.write(zipper.flush())
    size = out.stat().st_size
    copy.unlink()
    out.unlink()
    return {"raw_bytes": raw, "size": size}


def _timed(fn: Any) -> tuple[dict[str, Any], Meter]:
    meter = Meter()
    with meter():
        out = fn()
    return out, meter


def backup_rounds(env: Env, work: Path, progress: Progress) -> dict[str, Any]:
    """The backup job and its reference, `ROUNDS` times in alternating order."""
    pairs = []
    for i in range(ROUNDS):
        progress(f"backup and reference, round {i + 1} of {ROUNDS}")
        got: dict[str, tuple[dict[str, Any], Meter]] = {}
        for side in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
            got[side] = _timed(lambda s=side: _backup_job(env) if s == "ours" else reference(_db_path(env), work))
        pairs.append((got["ours"], got["reference"]))
    ratios = [round(ref[1].wall / ours[1].wall, 3) for ours, ref in pairs]
    median = sorted(range(ROUNDS), key=ratios.__getitem__)[ROUNDS // 2]
    (ours, mine), (ref, theirs) = pairs[median]
    mb = ours["raw_bytes"] / 1e6
    return {
        "backup_rows": ours["rows"], "db_mb": round(mb, 1), "backup_mb": round(ours["size"] / 1e6, 1),
        "compression_ratio": round(ours["raw_bytes"] / ours["size"], 2),
        "rows_per_s": round(ours["rows"] / mine.wall), "mb_per_s": round(mb / mine.wall, 1),
        "backup_alone_s": round(mine.wall, 2), "reference_s": round(theirs.wall, 2),
        "reference_mb_per_s": round(ref["raw_bytes"] / 1e6 / theirs.wall, 1),
        "ratio": ratios[median],
        "cpu_ratio": round(theirs.cpu / mine.cpu, 3), "round_ratios": ratios,
    }  # fmt: skip


def _db_path(env: Env) -> Path:
    return Path(env.config.bindings.db.removeprefix("sqlite:///"))


class Slice:
    """Batches of one slice of the consumer run: messages, latencies, wall-clock seconds and
    the CPU seconds of the consumer's own thread (the backup's thread is in the process's)."""

    def __init__(self) -> None:
        self.messages, self.wall, self.cpu = 0, 0.0, 0.0
        self.latencies: list[float] = []

    def run(self, worker: Worker, limit: int, until: Any = None) -> None:
        wall, cpu = clock.monotonic(), time.thread_time()
        while self.messages < limit and (until is None or not until()):
            result = worker.step(wait=0.0)
            if result is None:
                break
            if not result.ok:
                raise RuntimeError(f"batch failed during the benchmark: {result.error}")
            self.latencies.append(result.ms)
            self.messages += result.messages
        self.wall, self.cpu = clock.monotonic() - wall, time.thread_time() - cpu

    def rate(self) -> float:
        return self.messages / self.wall if self.wall else 0.0


def fill_queue(queue: SqlQueue, n: int, progress: Progress) -> None:
    events = sample.events(n, days=2, n_paths=2000, end_ms=int(time.time() * 1000) - 60_000, seed=11)
    for i, chunk in enumerate(iter(lambda: list(itertools.islice(events, SEND_CHUNK)), [])):
        queue.send_batch(chunk)
        if i % 40 == 0:
            progress(f"queued {i * SEND_CHUNK:,} of {n:,} events")


def consumer_beside_backup(env: Env, work: Path, events: int, progress: Progress) -> dict[str, Any]:
    """Slices without, during and after a backup (see the module doc)."""
    queue_db = Database(f"sqlite:///{work / 'queue.db'}")
    migrate.upgrade(queue_db)
    queue = ExternalQueue(queue_db, "events", queue_settings(env.config))
    fill_queue(queue, events, progress)
    before_total = totals.stats(env.DB)["total"]["events"]
    consumer_env = dataclasses.replace(env, QUEUE=queue)
    worker = Worker(consumer_env, traffic_handler(consumer_env))
    side = events // 10
    before, during, after = Slice(), Slice(), Slice()
    progress("consume without a backup")
    before.run(worker, side)
    made: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: made.update(_backup_job(env)), name="backup")
    progress("consume while the backup job runs")
    thread.start()
    during.run(worker, events - 2 * side, until=lambda: not thread.is_alive())
    outlasted = thread.is_alive()
    thread.join()
    progress("consume without a backup, again")
    after.run(worker, side)
    queue_db.dispose()
    consumed = before.messages + during.messages + after.messages
    without = (before.messages + after.messages) / (before.wall + after.wall)
    cpu_without = (before.messages + after.messages) / (before.cpu + after.cpu)
    return {
        "events_queued": events, "events_consumed": consumed, "events_during_backup": during.messages,
        "exact": totals.stats(env.DB)["total"]["events"] == before_total + consumed and made.get("rows", 0) > 0,
        "backup_beside_consumer_s": made.get("seconds"), "backup_outlasted": outlasted,
        "backup_rows_beside_consumer": made.get("rows"),
        "consumer_events_per_s": round(without), "consumer_during_backup_events_per_s": round(during.rate()),
        "consumer_ratio": round(during.rate() / without, 3) if without else 0.0,
        "consumer_cpu_ratio": round(during.messages / during.cpu / cpu_without, 3) if during.cpu else 0.0,
        "batch_p99_ms": percentile(before.latencies + after.latencies, 99),
        "batch_max_ms": round(max(before.latencies + after.latencies, default=0.0), 2),
        "during_backup_batch_p99_ms": percentile(during.latencies, 99),
        "during_backup_batch_max_ms": round(max(during.latencies, default=0.0), 2),
    }  # fmt: skip


def run(rows: int = 1_000_000, batch_size: int = 100, progress: Progress = quiet) -> dict[str, Any]:
    """Generate `rows` rows; time the backup against its reference; then the consumer beside
    a backup, draining a backlog of `rows` events. Returns the report."""
    log.setup("WARNING")
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        progress(f"generating {rows:,} rows")
        generate(work, rows)
        env = open_env(_config(work, batch_size))
        try:
            alone = backup_rounds(env, work, progress)
            beside = consumer_beside_backup(env, work, rows, progress)
        finally:
            env.close()
    return {"bench": "backup", "rows": rows, "batch_size": batch_size} | alone | beside
