"""The clean job on every DB backend: batches move rows from hot to cold keeping the
invariant at every commit, small objects share transactions, a run goes on until nothing
is left or its time budget is spent (and says so), counts are checked against the object
(a bad object is flagged alone), the stats file is written atomically with the last 10
runs."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from cleaner import stats_file
from pipeline import clock, totals
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


TINY = 0.001  # a `max_run_seconds` smaller than one transaction on the ticking clock


@contextmanager
def ticking(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`clock.monotonic` advances one second at every reading (no sleeps, no dependence on
    the machine's speed): a run with `max_run_seconds = TINY` stops after exactly one
    transaction. (freezegun freezes the real one, so without this a budget is never spent.)"""
    with monkeypatch.context() as m:
        m.setattr(clock, "monotonic", itertools.count(1000.0).__next__)
        yield


SMALL = {"max_rows_per_object": 2}  # `[archive]` of the tests of small objects


def _small_objects(env: Any, hours: int, per_hour: int) -> list[dict[str, Any]]:
    """`per_hour` rows in each of `hours` hours, archived as objects of 2 rows (`SMALL`)."""
    base = ms("2026-11-18T00:00:00Z")
    events = [
        event(h * 1000 + i, base + h * 3_600_000 + i * 1000, status=(200, 404, 503, 302)[i % 4])
        for h in range(hours)
        for i in range(per_hour)
    ]
    consume(env, events)
    result = run_job(env, "archive", NOW)
    assert (result["objects"], result["complete"]) == (hours * per_hour // 2, True)
    return events


def _statuses(env: Any) -> dict[str, str]:
    with env.DB.read() as conn:
        return dict(conn.execute(sa.select(archive_objects.c.key, archive_objects.c.status)).all())


def _held_rows(env: Any) -> int:
    """Rows of verified objects still held, from the records (what the monitor reads)."""
    left = sa.func.coalesce(sa.func.sum(archive_objects.c.row_count - archive_objects.c.cleaned_rows), 0)
    with env.DB.read() as conn:
        return int(conn.execute(sa.select(left).where(archive_objects.c.status == "verified")).scalar_one())


@freeze_time(CLEAN)
def test_batches_move_rows_to_cold_keeping_the_invariant(
    make_env: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object larger than batch_size is cleaned in transactions of batch_size rows; a
    run whose budget is spent stops between them and the next run resumes the object."""
    env = make_env(db_url, cleaner={"batch_size": 7, "max_run_seconds": TINY})
    events = _archived(env)
    consume(env, [event(1000, ms("2026-11-21T10:00:00Z"))])  # recent: stays hot
    runs = []
    with ticking(monkeypatch):
        while (r := run_job(env, "clean", CLEAN))["rows"]:
            runs.append((r["rows"], r["batches"], r["complete"], r["remaining_rows"]))
            assert r["remaining_rows"] == _held_rows(env) == len(hot_ids(env)) - 1
            _invariant(env)
    assert runs == [(7, 1, False, 33), (7, 1, False, 26), (7, 1, False, 19), (7, 1, False, 12), (7, 1, False, 5),
                    (5, 1, True, 0)]  # fmt: skip
    assert (r["complete"], r["remaining_rows"], r["batches"]) == (True, 0, 0)
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
def test_a_backlog_of_small_objects_is_cleaned_in_one_run(make_env: Any, db_url: str) -> None:
    """300 objects of 2 rows: 25 whole objects share each transaction of batch_size 50, and
    one run cleans them all (there is no cap on objects or transactions per run)."""
    env = make_env(db_url, cleaner={"batch_size": 50}, archive=SMALL)
    events = _small_objects(env, hours=6, per_hour=100)
    result = run_job(env, "clean", CLEAN)
    assert (result["objects"], result["rows"], result["batches"], result["refused"]) == (300, 600, 12, [])
    assert (result["complete"], result["remaining_rows"]) == (True, 0)
    assert set(_statuses(env).values()) == {"cleaned"} and hot_ids(env) == []
    s = _invariant(env)
    assert s["cold"]["events"] == s["total"]["events"] == len(events) and s["hot"]["events"] == 0
    assert s["cold"]["bytes_sum"] == sum(e["bytes"] for e in events)
    report = totals.verify(env.DB)
    assert report["ok"], report["problems"]
    again = run_job(env, "clean", CLEAN)
    assert (again["rows"], again["batches"], again["complete"], again["remaining_rows"]) == (0, 0, True, 0)


@freeze_time(CLEAN)
def test_a_run_stopped_by_its_budget_says_what_is_left_and_the_next_finishes(
    make_env: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(db_url, cleaner={"batch_size": 10, "max_run_seconds": TINY}, archive=SMALL)
    _small_objects(env, hours=2, per_hour=40)  # 40 objects of 2 rows: 5 per transaction
    with ticking(monkeypatch):
        first = run_job(env, "clean", CLEAN)
        assert (first["objects"], first["rows"], first["batches"]) == (5, 10, 1)
        assert (first["complete"], first["remaining_rows"]) == (False, 70)
        assert _held_rows(env) == len(hot_ids(env, (1,))) == 70
        _invariant(env)
        planned = run_job(env, "clean", CLEAN, dry_run=True)
        assert (planned["objects"], planned["rows"], planned["complete"], planned["remaining_rows"]) == (
            35, 70, False, 70,
        )  # fmt: skip
        env.config = env.config.replace(cleaner={"max_run_seconds": 900})  # 900 readings of the ticking clock
        second = run_job(env, "clean", CLEAN)
    assert (second["objects"], second["rows"], second["batches"]) == (35, 70, 7)
    assert (second["complete"], second["remaining_rows"]) == (True, 0)
    assert hot_ids(env) == [] and set(_statuses(env).values()) == {"cleaned"}
    assert totals.verify(env.DB)["ok"]
    stats = json.loads(Path(env.config.cleaner.stats_file).read_text())
    assert [h["rows_cleaned"] for h in stats["cleanup_history"]] == [10, 70]
    assert "stopped, 70 rows left" in stats["cleanup_history"][0]["reason"]


@freeze_time(CLEAN)
def test_a_bad_object_in_a_shared_transaction_is_flagged_alone(make_env: Any, db_url: str) -> None:
    """Ten objects of 2 rows share one transaction: one lost a row behind the archiver's
    back (mismatch), one is gone from the bucket (corrupt); only those two are flagged and
    keep their rows, the other eight are cleaned."""
    env = make_env(db_url, cleaner={"batch_size": 1000}, archive=SMALL)
    _small_objects(env, hours=1, per_hour=20)
    keys = sorted(_statuses(env))
    with env.DB.read() as conn:
        mismatched = conn.execute(sa.select(archive_objects).where(archive_objects.c.key == keys[3])).one()
    with env.DB.transaction() as conn:
        conn.execute(sa.delete(traffic_events).where(traffic_events.c.seq == mismatched.min_seq))
    env.ARCHIVE.delete(keys[6])
    result = run_job(env, "clean", CLEAN)
    assert sorted(result["refused"]) == [keys[3], keys[6]]
    assert (result["objects"], result["rows"], result["batches"]) == (8, 16, 1)
    assert (result["complete"], result["remaining_rows"]) == (True, 0)  # flagged objects are not cleanable
    statuses = _statuses(env)
    assert (statuses.pop(keys[3]), statuses.pop(keys[6])) == ("mismatch", "corrupt")
    assert set(statuses.values()) == {"cleaned"}
    assert len(hot_ids(env, (1,))) == 3  # the mismatched object's other row and the corrupt one's two
    s = totals.stats(env.DB)  # (the row deleted behind the archiver's back is missing from hot + cold)
    assert (s["hot"]["events"], s["cold"]["events"], s["total"]["events"]) == (3, 16, 20)
    with env.DB.read() as conn:
        error = conn.execute(sa.select(archive_objects.c.error).where(archive_objects.c.key == keys[3])).scalar_one()
    assert "1 rows held, expected 2" in error


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
def test_stats_file_is_written_atomically_with_last_ten_runs(
    make_env: Any, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(db_url, cleaner={"batch_size": 1, "max_run_seconds": TINY})
    _archived(env, 12)
    with ticking(monkeypatch):
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
    assert (result["objects"], result["rows"], result["complete"], result["remaining_rows"]) == (1, 5, False, 5)
    assert len(hot_ids(env)) == 5 and totals.stats(env.DB)["cold"]["events"] == 0
    assert run_job(env, "clean", CLEAN)["rows"] == 5
    result = run_job(env, "clean", CLEAN, dry_run=True)
    assert (result["objects"], result["rows"], result["complete"], result["remaining_rows"]) == (0, 0, True, 0)


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
