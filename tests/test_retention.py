"""Retention: the `expire` job deletes archive objects past `[retention] archive_days` (the
old cleaned ones only, manifests settled, totals untouched, replay naming the expired
hours); the `rollup` job folds closed days of hourly rows into daily rows (idempotent,
equal to the hourly rows summed per day, late events rolled in again) and prunes the
hourly rows of old days (`[retention] hourly_days`) with every total kept; the readers of
daily rows (CLI and HTTP); both jobs at their cron slots through the scheduler."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from archiver import replay
from archiver import verify as replay_verify
from archiver.objects import manifest_key
from cleaner.rollup import day_start
from pipeline import clock, meta, migrate, queries, totals
from pipeline.aggregate import AGG_COLUMNS
from pipeline.bindings.db import Database
from pipeline.clock import HOUR_MS
from pipeline.jobruns import JobStore
from pipeline.schema import ObjectStatus, archive_objects, path_stats_daily, path_stats_hourly
from scheduler.service import JobScheduler
from tests import archive_support
from tests.archive_support import consume, event, ms, run_job
from tests.conftest import run_cli

archive_url = archive_support.archive_url
archive_env = archive_support.archive_env

DAY_S = 86_400
START = "2026-11-10T00:00:00Z"  # three days of traffic: 2026-11-10, 11 and 12
PATHS = ["/a", "/b", "/c"]
HOSTS = ["api.example.com", "shop.example.com"]
LATENCIES = (0.5, 3.0, 42.0, 800.0, 70_000.0)
OTHER_JOBS_OFF = {"archive": "off", "clean": "off", "monitor": "off", "snapshot_prune": "off"}


def _traffic(days: int = 3, per_hour: int = 3, first: int = 0, start: str = START) -> list[dict[str, Any]]:
    rng = random.Random(first + 7)
    base = ms(start)
    out = []
    for h in range(days * 24):
        for k in range(per_hour):
            i = first + h * per_hour + k
            out.append(event(i, base + h * HOUR_MS + rng.randrange(HOUR_MS), path=rng.choice(PATHS),
                             status=rng.choice((200, 201, 304, 404, 500)), response_time_ms=rng.choice(LATENCIES),
                             host=rng.choice(HOSTS)))  # fmt: skip
    return out


def _load(env: Any) -> list[dict[str, Any]]:
    """Three days of traffic, archived and cleaned (the archive watermark at 2026-11-14T02:00)."""
    events = _traffic()
    with freeze_time("2026-11-13T00:10:00Z"):
        assert consume(env, events)["inserted"] == len(events)
    with freeze_time("2026-11-17T02:00:00Z"):
        run_job(env, "archive", "2026-11-17T02:00:00Z")
    with freeze_time("2026-11-17T03:00:00Z"):
        run_job(env, "clean", "2026-11-17T03:00:00Z")
    return events


def _records(env: Any) -> dict[str, tuple[int, str, int]]:
    ao = archive_objects.c
    with env.DB.read() as conn:
        return {k: (h, s, n) for k, h, s, n in conn.execute(sa.select(ao.key, ao.hour, ao.status, ao.size_bytes))}


def _bucket(env: Any) -> set[str]:
    return {info.key for info in env.ARCHIVE.list(env.config.archive.prefix + "/")}


def _table(env: Any, table: sa.Table) -> list[dict[str, Any]]:
    with env.DB.read() as conn:
        return [dict(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings()]


def _hourly_by_day(hourly: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The oracle of a rollup: hourly rows summed per day in Python (min/max kept)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in hourly:
        key = (row["hour"] - row["hour"] % DAY_S, row["host"], row["path"], row["method"])
        into = out.setdefault(key, dict.fromkeys(AGG_COLUMNS, 0) | {"rt_min_ms": math.inf, "rt_max_ms": -math.inf})
        for c in AGG_COLUMNS:
            if c == "rt_min_ms":
                into[c] = min(into[c], row[c])
            elif c == "rt_max_ms":
                into[c] = max(into[c], row[c])
            else:
                into[c] += row[c]
    return out


def _assert_rolled_up(daily: list[dict[str, Any]], hourly: list[dict[str, Any]]) -> None:
    want = _hourly_by_day(hourly)
    got = {(r["day"], r["host"], r["path"], r["method"]): r for r in daily}
    assert set(got) == set(want)
    for key, row in got.items():
        for c in AGG_COLUMNS:
            if c == "rt_sum_ms":
                assert math.isclose(row[c], want[key][c], rel_tol=1e-12), (key, c)
            else:
                assert row[c] == want[key][c], (key, c)


# -- expire ------------------------------------------------------------------------------


def test_expire_deletes_exactly_the_old_cleaned_objects_and_keeps_every_total(archive_env: Any) -> None:
    env = archive_env(retention={"archive_days": 5})
    _load(env)
    prefix = env.config.archive.prefix
    before, records, in_bucket = totals.stats(env.DB), _records(env), _bucket(env)
    cutoff = clock.parse_time("2026-11-11T06:00:00Z")  # 06:00 − 5 days
    old = {k for k, (hour, _s, _n) in records.items() if hour + 3600 <= cutoff}
    assert len(old) == 24 + 6 and {s for _h, s, _n in records.values()} == {ObjectStatus.CLEANED}

    with freeze_time("2026-11-16T06:00:00Z"):
        result = run_job(env, "expire", "2026-11-16T06:00:00Z")
    assert (result["objects"], result["rows"], result["days"], result["complete"]) == (30, 90, 2, True)
    assert result["bytes"] == sum(records[k][2] for k in old) and result["cutoff"] == "2026-11-11T06:00:00Z"
    assert (result["manifests_deleted"], result["manifests_written"], result["waiting"]) == (1, 1, 0)
    assert _bucket(env) == in_bucket - old - {manifest_key(prefix, "2026-11-10")}
    after = _records(env)
    assert {k for k, (_h, s, _n) in after.items() if s == ObjectStatus.EXPIRED} == old
    assert {s for k, (_h, s, _n) in after.items() if k not in old} == {ObjectStatus.CLEANED}
    manifest = orjson.loads(env.ARCHIVE.get_bytes(manifest_key(prefix, "2026-11-11")))
    assert Counter(e["status"] for e in manifest["entries"]) == {"expired": 6, "cleaned": 18}
    assert totals.stats(env.DB) == before and totals.verify(env.DB)["ok"]

    report = replay_verify.verify(env.DB, env.ARCHIVE, prefix, clock.parse_time(START), clock.parse_time("2026-11-14"))
    assert report["ok"] and report["mismatches"] == [] and report["bad"] == []
    assert report["expired_hours"] == sorted(records[k][0] for k in old) and report["archived_rows"] == 216 - 90
    with freeze_time("2026-11-17T06:00:00Z"):  # a day later: the rest of 2026-11-11, and 2026-11-12 00-05h
        again = run_job(env, "expire", "2026-11-17T06:00:00Z")
    assert (again["objects"], again["manifests_deleted"], again["manifests_written"]) == (18 + 6, 1, 1)
    assert not any(key.startswith(f"{prefix}/dt=2026-11-11/") for key in _bucket(env))
    assert manifest_key(prefix, "2026-11-12") in _bucket(env) and totals.stats(env.DB) == before


def test_replay_commands_name_the_expired_hours(make_env: Any, db_url: str, tmp_path: Path) -> None:
    env = make_env(db_url, retention={"archive_days": 5})
    _load(env)
    with freeze_time("2026-11-16T06:00:00Z"):
        run_job(env, "expire", "2026-11-16T06:00:00Z")
    span = "2026-11-10T00:00:00Z to 2026-11-11T05:00:00Z"
    window = ("--from", "2026-11-10", "--to", "2026-11-13")
    res = run_cli(env, "replay", "verify", *window, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and len(report["expired_hours"]) == 30 and report["mismatches"] == []
    assert f"30 expired hours, their objects deleted by [retention] archive_days: {span}" in res.stderr
    res = run_cli(env, "replay", "list", *window)
    assert res.exit_code == 0 and span in res.stderr and "42 objects" in res.stdout
    res = run_cli(env, "replay", "restore", *window, "--json")
    assert res.exit_code == 0 and span in res.stderr
    restored = json.loads(res.stdout)
    assert restored["inserted"] == 216 - 90 and len(restored["expired_hours"]) == 30
    res = run_cli(env, "replay", "export", "--from", "2026-11-11T04:00:00Z", "--to", "2026-11-11T08:00:00Z")
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 6
    assert "2 expired hours" in res.stderr and "2026-11-11T04:00:00Z to 2026-11-11T05:00:00Z" in res.stderr
    assert totals.verify(env.DB)["ok"]


def test_expire_keeps_objects_forever_by_default_and_waits_for_the_cleaner(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    with freeze_time("2026-11-13T00:10:00Z"):
        consume(env, _traffic())
    run_job(env, "archive", "2026-11-17T02:00:00Z")  # archived, not cleaned
    in_bucket = _bucket(env)
    forever = run_job(env, "expire", "2026-12-31T06:00:00Z")
    assert forever["objects"] == 0 and "kept forever" in forever["skipped"]
    waiting_env = env.__class__(env.config.replace(retention={"archive_days": 5}), env.DB, env.QUEUE, env.KV,
                                env.ARCHIVE)  # fmt: skip
    waiting = run_job(waiting_env, "expire", "2026-12-31T06:00:00Z")
    assert (waiting["objects"], waiting["waiting"]) == (0, 72)
    assert run_job(waiting_env, "expire", "2026-12-31T06:00:00Z", dry_run=True)["objects"] == 0
    assert _bucket(env) == in_bucket and totals.verify(env.DB)["ok"]
    run_job(env, "clean", "2026-11-17T03:00:00Z")
    planned = run_job(waiting_env, "expire", "2026-12-31T06:00:00Z", dry_run=True)
    assert (planned["objects"], planned["rows"]) == (72, 216) and _bucket(env) == in_bucket
    assert run_job(waiting_env, "expire", "2026-12-31T06:00:00Z")["objects"] == 72
    assert _bucket(env) == set() and totals.verify(env.DB)["ok"]


# -- rollup ------------------------------------------------------------------------------


def test_rollup_is_idempotent_and_equals_the_hourly_rows_summed_per_day(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    events = _traffic()
    with freeze_time("2026-11-13T00:20:00Z"):
        consume(env, [*events, event(9_999, ms("2026-11-13T00:05:00Z"))])  # the open day
        first = run_job(env, "rollup", "2026-11-13T00:15:00Z")
        rows = _table(env, path_stats_daily)
        second = run_job(env, "rollup", "2026-11-13T00:15:00Z")
    assert (first["days"], first["first_day"], first["last_day"]) == (3, "2026-11-10T00:00:00Z", "2026-11-12T00:00:00Z")
    assert first["daily_rows"] == len(rows) == second["daily_rows"] and second["days"] == 3
    assert _table(env, path_stats_daily) == rows
    hourly = [r for r in _table(env, path_stats_hourly) if r["hour"] < clock.parse_time("2026-11-13")]
    _assert_rolled_up(rows, hourly)
    truth = Counter((day_start(e["ts"] / 1000), e["path"]) for e in events)
    got: Counter[tuple[int, str]] = Counter()
    for r in rows:
        got[(r["day"], r["path"])] += r["requests"]
    assert got == truth


def test_a_late_event_in_a_recent_day_is_rolled_in_on_the_next_run(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    with freeze_time("2026-11-13T00:20:00Z"):
        consume(env, _traffic())
        run_job(env, "rollup", "2026-11-13T00:15:00Z")
    before = {(r["day"], r["host"], r["path"]): r for r in _table(env, path_stats_daily)}
    day = int(clock.parse_time("2026-11-11"))
    with freeze_time("2026-11-13T12:00:00Z"):
        late = [event(50_000, ms("2026-11-11T12:30:00Z"), path="/a", host=HOSTS[0], response_time_ms=90_000.0),
                event(50_001, ms("2026-11-11T13:30:00Z"), path="/late", host=HOSTS[0])]  # fmt: skip
        assert consume(env, late)["inserted"] == 2
    with freeze_time("2026-11-14T00:20:00Z"):
        result = run_job(env, "rollup", "2026-11-14T00:15:00Z")
    assert (result["days"], result["first_day"]) == (3, "2026-11-10T00:00:00Z")  # the closed days, again
    after = {(r["day"], r["host"], r["path"]): r for r in _table(env, path_stats_daily)}
    key = (day, HOSTS[0], "/a")
    assert after[key]["requests"] == before[key]["requests"] + 1 and after[key]["rt_max_ms"] == 90_000.0
    assert after[key]["lat_gt_60000"] == before[key]["lat_gt_60000"] + 1
    assert after[(day, HOSTS[0], "/late")]["requests"] == 1 and (day, HOSTS[0], "/late") not in before
    _assert_rolled_up(list(after.values()), _table(env, path_stats_hourly))


def test_pruning_hourly_rows_keeps_totals_verify_replay_and_the_daily_reader(
    make_env: Any, db_url: str, tmp_path: Path
) -> None:
    env = make_env(db_url, retention={"hourly_days": 5})
    events = _load(env)
    hourly, before = _table(env, path_stats_hourly), totals.stats(env.DB)
    with freeze_time("2026-11-18T00:20:00Z"):
        result = run_job(env, "rollup", "2026-11-18T00:15:00Z")
    assert (result["pruned_days"], result["hourly_rows_pruned"]) == (3, len(hourly))
    assert result["hourly_pruned_before"] == "2026-11-13T00:00:00Z"
    assert _table(env, path_stats_hourly) == []
    daily = _table(env, path_stats_daily)
    _assert_rolled_up(daily, hourly)
    assert totals.stats(env.DB) == before and before["total"]["events"] == len(events)
    assert totals.verify(env.DB)["ok"]
    with freeze_time("2026-11-19T00:20:00Z"):  # pruned days are never rolled up again
        assert run_job(env, "rollup", "2026-11-19T00:15:00Z")["pruned_days"] == 0
    assert _table(env, path_stats_daily) == daily

    with freeze_time("2026-11-18T12:00:00Z"):
        res = run_cli(env, "paths", "daily", "--days", "30", "--json")
        table = run_cli(env, "paths", "daily", "--path", "/a")
    assert res.exit_code == 0 and table.exit_code == 0 and "daily (UTC)" in table.stdout
    shown = json.loads(res.stdout)
    assert sorted({r["day"] for r in shown}) == ["2026-11-10T00:00:00Z", "2026-11-11T00:00:00Z", "2026-11-12T00:00:00Z"]
    assert sum(r["requests"] for r in shown) == len(events) and {"p50_ms", "p99_ms", "rt_avg_ms"} <= set(shown[0])

    store, prefix = env.ARCHIVE, env.config.archive.prefix
    lo, hi = clock.parse_time(START), clock.parse_time("2026-11-14")
    report = replay_verify.verify(env.DB, store, prefix, lo, hi)
    assert report["ok"] and report["archived_rows"] == len(events) and report["pruned_hours"] == []
    part = replay_verify.verify(env.DB, store, prefix, lo + 6 * 3600, hi)  # cuts 2026-11-10: its hours are named
    assert part["ok"] and part["pruned_hours"] == [int(lo) + h * 3600 for h in range(6, 24)]
    with env.DB.transaction() as conn:
        conn.execute(sa.update(path_stats_daily).where(path_stats_daily.c.path == "/b")
                     .values(requests=path_stats_daily.c.requests + 1))  # fmt: skip
    tampered = replay_verify.verify(env.DB, store, prefix, lo, hi)
    assert not tampered["ok"] and {(m["path"], m["column"], m["daily"]) for m in tampered["mismatches"]} == {
        ("/b", "requests", True)
    }
    assert not totals.verify(env.DB)["ok"]
    with env.DB.transaction() as conn:
        conn.execute(sa.update(path_stats_daily).where(path_stats_daily.c.path == "/b")
                     .values(requests=path_stats_daily.c.requests - 1))  # fmt: skip

    same = replay.rebuild(store, prefix, lo, hi, env.DB)  # into a database that pruned those days
    assert same["hourly_rows"] == 0 and "not rebuilt" in same["note"] and same["pruned_hours_skipped"] == 96
    assert _table(env, path_stats_hourly) == [] and totals.verify(env.DB)["ok"]
    fresh = Database(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    try:
        migrate.upgrade(fresh)
        assert replay.rebuild(store, prefix, lo, hi, fresh)["hourly_rows"] == len(hourly)
    finally:
        fresh.dispose()
    with env.DB.transaction() as conn:  # an hourly row brought back by hand would count twice
        conn.execute(sa.insert(path_stats_hourly).values(hourly[0]))
    problems = totals.verify(env.DB)["problems"]
    assert "1 hourly rows before 2026-11-14T00:00:00Z, where the daily rows hold the pruned days" in problems


def test_nothing_is_pruned_before_the_archive_has_run(make_env: Any, db_url: str) -> None:
    env = make_env(db_url, retention={"hourly_days": 5})
    with freeze_time("2026-11-13T00:20:00Z"):
        consume(env, _traffic())
    result = run_job(env, "rollup", "2026-11-30T00:15:00Z")
    assert result["pruned_days"] == 0 and "no archive watermark" in result["prune_note"] and result["days"] == 3
    with env.DB.read() as conn:
        assert meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE) == 0
    assert len(_table(env, path_stats_hourly)) > 0 and totals.verify(env.DB)["ok"]


# -- through the scheduler and the HTTP API ----------------------------------------------


def test_rollup_and_expire_run_at_their_cron_slots(make_env: Any, db_url: str) -> None:
    env = make_env(db_url, retention={"archive_days": 5, "hourly_days": 5}, schedule={"jobs": OTHER_JOBS_OFF})
    events = _load(env)
    before = totals.stats(env.DB)
    sched = JobScheduler(env, "w")
    with freeze_time("2026-11-18T00:14:00Z") as frozen:
        assert sched.tick() == []
        frozen.move_to("2026-11-18T00:15:00Z")
        assert [(o.job, o.status) for o in sched.tick()] == [("rollup", "succeeded")]
        frozen.move_to("2026-11-18T05:59:00Z")
        assert sched.tick() == []
        frozen.move_to("2026-11-18T06:00:00Z")
        assert [(o.job, o.status) for o in sched.tick()] == [("expire", "succeeded")]
    runs = {r["job"]: r for r in JobStore(env.DB).history()}
    assert runs["rollup"]["scheduled_for"] == "2026-11-18T00:15:00Z" and runs["rollup"]["result"]["pruned_days"] == 3
    assert runs["expire"]["scheduled_for"] == "2026-11-18T06:00:00Z" and runs["expire"]["result"]["objects"] == 72
    assert _bucket(env) == set()  # every day expired: objects and manifests gone
    assert totals.stats(env.DB) == before and before["total"]["events"] == len(events)
    assert totals.verify(env.DB)["ok"]
    assert {s for _h, s, _n in _records(env).values()} == {ObjectStatus.EXPIRED}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_http_paths_daily_pages_filters_and_refuses_windows_beyond_the_hourly_rows(
    make_env: Any, db_url: str
) -> None:
    from pipeline.http.app import create_app
    from tests.http_support import client_for

    env = make_env(db_url, retention={"hourly_days": 5})
    today = day_start(clock.now_s())
    start = clock.iso(today - 3 * DAY_S)
    consume(env, _traffic(days=3, per_hour=1, start=start))
    run_job(env, "rollup", clock.iso(today + 15 * 60))
    expected = list(queries.daily(env.DB, start=today - 30 * DAY_S))
    assert {r["day"] for r in expected} == {clock.iso(today - d * DAY_S) for d in (1, 2, 3)}
    async with client_for(create_app(env)) as c:
        full = (await c.get("/v1/paths/daily")).json()
        pages, cursor = [], None
        while True:
            page = (await c.get("/v1/paths/daily", params={"limit": 4} | ({"cursor": cursor} if cursor else {}))).json()
            pages += page["rows"]
            if (cursor := page["next"]) is None:
                break
        one = (await c.get("/v1/paths/daily", params={"path": "/a", "host": HOSTS[1], "days": 2})).json()
        window = (await c.get("/v1/paths/daily", params={"from": clock.iso(today - 2 * DAY_S)})).json()
        bad_days = await c.get("/v1/paths/daily", params={"days": 0})
        too_long = await c.get("/v1/paths/top", params={"hours": 6 * 24})
        ok_top = await c.get("/v1/paths/top", params={"hours": 5 * 24})
    assert full == {"rows": expected, "next": None} and pages == expected
    assert one["rows"] and {(r["path"], r["host"]) for r in one["rows"]} == {("/a", HOSTS[1])}
    assert {r["day"] for r in one["rows"]} <= {clock.iso(today - d * DAY_S) for d in (1, 2)}
    assert {r["day"] for r in window["rows"]} == {clock.iso(today - d * DAY_S) for d in (1, 2)}
    assert bad_days.status_code == 400 and bad_days.json()["detail"].startswith("days")
    assert too_long.status_code == 400 and too_long.json()["detail"].startswith("hours: at most 120")
    assert ok_top.status_code == 200
