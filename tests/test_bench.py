"""The consume benchmark's harness on a small run: every event is consumed exactly once per
pass, the raw reference gets the same rows, and the snapshot race really refreshes. Its
figures are not judged here (benchmarks are not timed tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
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


def test_bench_clean_measures_small_objects_sharing_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean benchmark's rows are archived in objects of at most `CLEAN_OBJECT_ROWS`
    (here 40, below an hour's rows), so what it times is whole objects sharing
    transactions of `batch_size`; its reference deletes every row."""
    from pipeline.bench import archive

    log.setup("WARNING")
    monkeypatch.setattr(archive, "CLEAN_OBJECT_ROWS", 40)
    archive.generate(tmp_path, 12_000)  # ~100 rows an hour over 5 days
    archived = archive.phase_archive_small(tmp_path)
    assert archived["rows"] == 12_000 and archived["objects"] >= 300  # 12,000 / 40, and the hours' last ones
    archive._keep_db(tmp_path, "archived.db")
    archive._restore_db(tmp_path, "archived.db", "ref.db")
    cleaned = archive.phase_clean(tmp_path)
    assert (cleaned["rows"], cleaned["complete"], cleaned["remaining_rows"]) == (12_000, True, 0)
    assert cleaned["objects"] == archived["objects"]
    assert cleaned["batches"] <= 15  # ~25 whole objects share each transaction of batch_size 1000
    assert archive.phase_clean_ref(tmp_path)["rows"] == 12_000


def test_bench_ingest_stores_every_event_once_per_round() -> None:
    """Every round's ingest enqueues each generated event once; its figures are not judged."""
    from pipeline.bench import ingest

    result = ingest.run(3000, rounds=2)
    assert (result["events"], result["enqueued"], result["rejected"], result["stored"]) == (3000, 3000, 0, [3000] * 2)
    assert len(result["round_ratios"]) == 2
    for key in ("events_per_s", "reference_rows_per_s", "ratio", "cpu_ratio"):
        assert result[key] > 0, key


def test_bench_ingest_reference_inserts_the_rows_ingest_wrote(tmp_path: Path) -> None:
    """The queue rows are the file's lines as they are, and the reference stores exactly them."""
    from pipeline.bench import ingest

    log.setup("WARNING")
    source, template = tmp_path / "events.ndjson", tmp_path / "template.db"
    ingest.write_sample(source, 2500)
    ingest.empty_schema(template)
    _, result = ingest.ours(template, tmp_path, source)
    assert (result.enqueued, result.rejected) == (2500, [])
    rows = ingest.queue_rows(tmp_path / "ours.db")
    assert [r[3] for r in rows] == source.read_bytes().splitlines()
    assert {(r[0], r[2], r[6]) for r in rows} == {("events", "json", 0)}
    ingest.reference(template, tmp_path, rows)
    assert ingest.queue_rows(tmp_path / "reference.db") == rows


@pytest.mark.slow
def test_bench_scale_drains_with_real_workers_and_checks_exactness() -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["bench", "scale", "--workers", "1,2", "--events", "3000", "--batch-size", "100", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    report = orjson.loads(result.stdout)
    assert (report["events"], report["db"], report["queue"]) == (3000, "sqlite", "db")
    assert [r["workers"] for r in report["runs"]] == [1, 2]
    assert all(r["exact"] for r in report["runs"])
    assert report["runs"][0]["speedup"] == 1.0
    assert all(r["events_per_s"] > 0 and r["cpu_s_per_1000_events"] >= 0 for r in report["runs"])


@pytest.mark.parametrize("workers", ["0", "1,x", ""])
def test_bench_scale_refuses_bad_worker_counts(workers: str) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bench", "scale", "--workers", workers])
    assert result.exit_code == 2 and "--workers" in result.output
