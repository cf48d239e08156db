"""The clean job on every DB backend: batches move rows from hot to cold keeping the
invariant at every commit, counts are checked against the object, the stats file is
written atomically with the last 10 runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from cleaner import stats_file
from pipeline import totals
from pipeline.schema import archive_objects, traffic_events
from tests.archive_support import consume, event, hot_ids, ms, run_job

NOW = "2026-11-22T02:00:00Z"
CLEAN = "2026-11-22T03:00:00Z"


def _archived(env: Any, n: int = 40) -> list[dict[str, Any]]:
    events = [event(i, ms("2026-11-18T10:00:00Z") + i * 1000, status=(200, 404, 503, 302)[i % 4]) for i in range(n)]
    consume(env, events)
    run_job(env, "archive", NOW)
    return events


def _invariant(env: Any) -> dict[str, Any]:
    s = totals.stats(env.DB)
    assert totals.check_totals(s) == []
    return s


@freeze_time(CLEAN)
def test_batches_move_rows_to_cold_keeping_the_invariant(make_env: Any, db_url: str) -> None:
    env = make_env(db_url, cleaner={"batch_size": 7, "max_batches": 2})
    events = _archived(env)
    consume(env, [event(1000, ms("2026-11-21T10:00:00Z"))])  # recent: stays hot
    runs = []
    while (r := run_job(env, "clean", CLEAN))["rows"]:
        runs.append(r["rows"])
        _invariant(env)
    assert runs == [14, 14, 12]
    s = _invariant(env)
    assert s["cold"]["events"] == 40 and s["hot"]["events"] == 1 and s["total"]["events"] == 41
    assert s["cold"]["status_4xx"] == 10 and s["cold"]["status_5xx"] == 10 and s["cold"]["status_3xx"] == 10
    assert s["cold"]["bytes_sum"] == sum(e["bytes"] for e in events)
    assert abs(s["cold"]["rt_sum_ms"] - sum(e["response_time_ms"] for e in events)) < 1e-6
    assert hot_ids(env) == ["ev-1000"]
    with env.DB.read() as conn:
        (status, cleaned) = conn.execute(sa.select(archive_objects.c.status, archive_objects.c.cleaned_rows)).one()
    assert (status, cleaned) == ("cleaned", 40)
    assert totals.verify(env.DB)["ok"]


@freeze_time(CLEAN)
def test_count_mismatch_rolls_back_and_flags_the_object(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _archived(env, 10)
    with env.DB.transaction() as conn:  # a row of the object vanishes behind the archiver's back
        conn.execute(sa.delete(traffic_events).where(traffic_events.c.id == "ev-3"))
    result = run_job(env, "clean", CLEAN)
    assert result["rows"] == 0 and len(result["refused"]) == 1
    assert len(hot_ids(env)) == 9
    s = totals.stats(env.DB)
    assert s["cold"]["events"] == 0
    with env.DB.read() as conn:
        assert conn.execute(sa.select(archive_objects.c.status)).scalar_one() == "mismatch"
    report = totals.verify(env.DB)
    assert not report["ok"] and any("mismatch" in p for p in report["problems"])


@freeze_time(CLEAN)
def test_stats_file_is_written_atomically_with_last_ten_runs(make_env: Any, db_url: str, tmp_path: Path) -> None:
    env = make_env(db_url, cleaner={"batch_size": 1, "max_batches": 1})
    _archived(env, 12)
    for _ in range(12):
        run_job(env, "clean", CLEAN)
    path = Path(env.config.cleaner.stats_file)
    doc = json.loads(path.read_text())
    assert set(doc) == {"meta", "lifetime_totals", "cleanup_history"}
    assert doc["meta"]["version"] == 1 and doc["meta"]["last_updated"] == "2026-11-22T03:00:00Z"
    assert doc["lifetime_totals"]["events"] == 12
    assert len(doc["cleanup_history"]) == 10
    assert all(h["rows_cleaned"] == 1 and h["objects"] == 1 and h["reason"] for h in doc["cleanup_history"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_atomic_writer_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "s" / "lifetime_stats.json"
    stats_file.write_atomic(path, b"old")

    def boom(*_a: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        stats_file.write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@freeze_time(CLEAN)
def test_dry_run_deletes_nothing(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _archived(env, 5)
    result = run_job(env, "clean", CLEAN, dry_run=True)
    assert (result["objects"], result["rows"]) == (1, 5)
    assert len(hot_ids(env)) == 5 and totals.stats(env.DB)["cold"]["events"] == 0


@freeze_time(CLEAN)
def test_reclaim_space_on_sqlite(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, cleaner={"reclaim_space": True})
    _archived(env, 50)
    first = run_job(env, "clean", CLEAN)
    assert first["rows"] == 50 and first["reclaim"].startswith("vacuum")
    with env.DB.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2
    consume(env, [event(100 + i, ms("2026-11-21T11:00:00Z") + i) for i in range(5)])
    assert run_job(env, "archive", "2026-11-25T02:00:00Z")["rows"] == 5
    assert run_job(env, "clean", CLEAN)["reclaim"] == "incremental_vacuum"
    assert totals.verify(env.DB)["ok"]
