"""`edgepipe bench ingest`: `edgepipe ingest FILE` against the raw SQLite insert of the
same queue rows.

N generated events (`pipeline.sample`) are written to an NDJSON file. Each round ingests
that file into a fresh SQLite database the way `edgepipe ingest FILE` does (the file's
identity, validation, sends of 1000 messages, each with its checkpoint) and, as the
reference, inserts the queue rows that the ingest wrote (every column the queue writes,
the same values) into a fresh copy of the same empty schema with stdlib sqlite3
`executemany`, 1000 rows per transaction, under the DB binding's PRAGMAs. The rounds
alternate which side goes first; the round with the median ratio is reported, and every
round's ratio is in `round_ratios`.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

import orjson

from pipeline import log, migrate, sample
from pipeline.bench.common import Meter, Progress, quiet
from pipeline.bindings.db import SQLITE_BUSY_TIMEOUT_MS, Database
from pipeline.bindings.queue_sql import SEND_COLUMNS
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.paths import PathNormalizer
from pipeline.producer import IngestResult, ingest_file
from pipeline.schema import queue_messages

RAW_CHUNK = 1000  # rows per transaction: what one send of `edgepipe ingest` commits
PRAGMAS = (  # the DB binding's (pipeline.bindings.db.engine)
    "journal_mode=WAL",
    "synchronous=NORMAL",
    f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
    "foreign_keys=ON",
    "secure_delete=FAST",
)


def write_sample(path: Path, n: int) -> int:
    """`n` generated events as NDJSON at `path`, one compact object a line; returns the bytes written."""
    with path.open("wb") as out:
        for event in sample.events(n, days=2, n_paths=2000, seed=7):
            out.write(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
    return path.stat().st_size


def empty_schema(path: Path) -> None:
    """A migrated, empty edgepipe database at `path`, all in the main file (no WAL left)."""
    db = Database(f"sqlite:///{path}")
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def ours(template: Path, work: Path, source: Path) -> tuple[Meter, IngestResult]:
    """`edgepipe ingest SOURCE` into a fresh copy of `template`, timed (the WAL checkpoints
    its commits asked for included)."""
    db_path = work / "ours.db"
    shutil.copyfile(template, db_path)
    cfg = Config().replace(bindings={"db": f"sqlite:///{db_path}", "archive": f"file://{work / 'archive'}"})
    env = open_env(cfg, check_schema=False)
    normalizer = PathNormalizer(cfg.paths)
    meter = Meter()
    try:
        with meter(), source.open("rb") as stream:
            result = ingest_file(stream, env.QUEUE, normalizer, env.DB)
            env.DB.wait_checkpoints()
    finally:
        env.close()
    return meter, result


def queue_rows(db_path: Path) -> list[tuple[Any, ...]]:
    """The rows the queue holds, in `SEND_COLUMNS` order, as it stored them."""
    with sqlite3.connect(db_path) as con:
        rows = con.execute(f"SELECT {', '.join(SEND_COLUMNS)} FROM {queue_messages.name} ORDER BY seq").fetchall()
    con.close()
    return rows


def reference(template: Path, work: Path, rows: list[tuple[Any, ...]]) -> Meter:
    """The raw limit: `rows` into a fresh copy of `template` with stdlib executemany,
    `RAW_CHUNK` rows per transaction, under the DB binding's PRAGMAs; timed."""
    db_path = work / "reference.db"
    shutil.copyfile(template, db_path)
    sql = (f"INSERT INTO {queue_messages.name} ({', '.join(SEND_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(SEND_COLUMNS))})")  # fmt: skip
    meter = Meter()
    con = sqlite3.connect(db_path, isolation_level=None)
    try:
        for pragma in PRAGMAS:
            con.execute(f"PRAGMA {pragma}")
        with meter():
            for i in range(0, len(rows), RAW_CHUNK):
                con.execute("BEGIN IMMEDIATE")
                con.executemany(sql, rows[i : i + RAW_CHUNK])
                con.execute("COMMIT")
        (count,) = con.execute(f"SELECT count(*) FROM {queue_messages.name}").fetchone()
    finally:
        con.close()
    if count != len(rows):
        raise RuntimeError(f"the reference stored {count:,} rows of {len(rows):,}")
    return meter


def run(n: int = 500_000, rounds: int = 3, progress: Progress = quiet) -> dict[str, Any]:
    """Ingest `n` generated events `rounds` times, each round beside its raw reference;
    returns the report (see docs/benchmarks.md)."""
    log.setup("WARNING")
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        progress(f"generating {n:,} events as NDJSON")
        source = work / "events.ndjson"
        size = write_sample(source, n)
        template = work / "template.db"
        empty_schema(template)
        rows: list[tuple[Any, ...]] = []
        measured: list[dict[str, Any]] = []
        for r in range(rounds):
            progress(f"round {r + 1} of {rounds}")
            round_dir = work / f"round{r}"
            round_dir.mkdir()
            got: dict[str, Any] = {}
            for side in ("ours", "reference") if r % 2 == 0 else ("reference", "ours"):  # round 0: ours first
                if side == "reference":
                    got["reference"] = reference(template, round_dir, rows)
                    continue
                got["meter"], got["result"] = ours(template, round_dir, source)
                stored = queue_rows(round_dir / "ours.db")
                rows = rows or stored  # the reference inserts the rows of the first round
                got["stored"] = len(stored)
            measured.append(got)
            shutil.rmtree(round_dir)
    return _report(n, size, measured)


def _report(n: int, size: int, measured: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [m["reference"].wall / m["meter"].wall for m in measured]
    median = statistics.median_low(ratios)
    chosen = measured[ratios.index(median)]
    ours_m, ref_m, result = chosen["meter"], chosen["reference"], chosen["result"]
    return {
        "events": n,
        "file_mb": round(size / 2**20, 1),
        "rounds": len(measured),
        "enqueued": result.enqueued,
        "rejected": len(result.rejected),
        "stored": [m["stored"] for m in measured],
        "events_per_s": round(n / ours_m.wall),
        "reference_rows_per_s": round(n / ref_m.wall),
        "ratio": round(median, 4),
        "round_ratios": [round(x, 4) for x in ratios],
        "cpu_ratio": round(ref_m.cpu / ours_m.cpu, 4),
    }
