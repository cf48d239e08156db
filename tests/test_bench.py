"""The consume benchmark's harness on a small run: every event is consumed exactly once per
pass, the raw reference gets the same rows, and the snapshot race really refreshes. Its
figures are not judged here (benchmarks are not timed tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipeline import log
from pipeline.bench import consume
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.worker import Worker


def test_bench_consume_counts_every_event_once_per_pass() -> None:
    result = consume.run(3000, batch_size=100, snapshots=True)
    assert (result["inserted"], result["duplicates_inserted"]) == (3000, 0)
    assert result["snapshot_refreshes"] >= 1
    for key in ("ratio", "duplicate_ratio", "cpu_ratio", "raw_events_per_s", "snapshot_events_per_s"):
        assert result[key] > 0, key


def test_race_inserts_the_consumed_rows_raw_and_refuses_a_short_queue(tmp_path: Path) -> None:
    from consumers.traffic import TrafficConsumer
    from pipeline import migrate, sample

    log.setup("WARNING")
    events = list(sample.events(500, days=1, n_paths=20, seed=1))
    rows = [(e["ts"], e["id"], e["method"], e["path"], e["status"], e["response_time_ms"], e["host"], e["colo"],
             e["bytes"]) for e in events]  # fmt: skip
    cfg = Config().replace(
        bindings={"db": f"sqlite:///{tmp_path / 'e.db'}", "archive": f"file://{tmp_path / 'a'}"},
        consumer={"max_batch_size": 64, "max_batch_timeout": 0, "snapshot_every_batches": 0},
    )
    env = open_env(cfg, check_schema=False)
    try:
        migrate.upgrade(env.DB)
        env.QUEUE.send_batch(events)
        worker = Worker(env, TrafficConsumer(cfg).handle_batch)
        got = consume.race(worker, rows, tmp_path / "raw.db")
        assert got["inserted"] == 500 and len(got["latencies"]) == 8  # 7 × 64 + 52
        with sqlite3.connect(tmp_path / "raw.db") as con:
            assert con.execute("SELECT id FROM raw ORDER BY seq").fetchall() == [(r[1],) for r in rows]
        env.QUEUE.send_batch(events[:10])
        with pytest.raises(RuntimeError, match="took 10 messages, 500 were sent"):
            consume.race(worker, rows, tmp_path / "raw2.db")
    finally:
        env.close()
