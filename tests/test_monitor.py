"""The capacity report (monitor job, `edgepipe monitor`) and worker health (`edgepipe
status`), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from freezegun import freeze_time

from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.heartbeat import Heartbeat
from pipeline.heartbeat import status as worker_status
from pipeline.schema import archive_objects, job_runs
from pipeline.worker import Worker
from scheduler.monitor import report
from scheduler.runner import run_by_hand
from tests.conftest import run_cli
from tests.traffic_truth import make_events

NOW = "2026-11-20T12:00:00Z"
DAY_MS = 86_400_000


def _load(env: Any, n: int, age_ms: int, seed: int) -> None:
    pairs = make_events(seed=seed, n=n, now_ms=clock.now_ms() - age_ms, span_ms=3_600_000)
    env.QUEUE.send_batch([b for b, _ in pairs])
    Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)


def _cli(env: Any, *args: str) -> Any:
    monitor = {f"EDGEPIPE_MONITOR__{k.upper()}": str(v) for k, v in env.config.monitor.model_dump().items()}
    return run_cli(env, *args, environ=monitor)


def test_report_counts_sizes_depths_and_archive_totals(env: Any) -> None:
    with freeze_time(NOW):
        _load(env, 300, age_ms=DAY_MS, seed=1)
        env.QUEUE.send_batch([{"id": "x"}] * 7)  # waiting, unconsumed
        with env.DB.transaction() as conn:
            conn.execute(
                archive_objects.insert(),
                [
                    {"key": f"o{i}", "hour": 0, "status": "verified", "row_count": 10 * i, "size_bytes": 1000 * i,
                     "min_seq": 1, "max_seq": 2, "created_at": 0.0}
                    for i in (1, 2)
                ],
            )  # fmt: skip
        r = report(env)
    assert r["generated_at"] == "2026-11-20T12:00:00Z"
    assert r["rows"]["traffic_events"] == 300
    assert r["rows"]["queue_messages"] == 7
    assert r["queue_depth"] == 7 and r["dlq_depth"] == 0
    assert r["db_bytes"] > 0
    assert r["table_bytes"]["traffic_events"] > 0 and r["table_bytes"]["path_stats_hourly"] > 0
    assert sum(r["table_bytes"].values()) <= r["db_bytes"]
    assert r["archive"] == {"available": True, "objects": 2, "rows": 30, "bytes": 3000}
    assert r["growth_7d_bytes"] is None and r["days_until_full"] is None  # no history yet
    assert 0.95 <= r["oldest_unarchived_age_days"] <= 1.05
    assert r["alerts"] == []


def test_growth_and_days_left_from_an_earlier_monitor_run(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, monitor={"capacity_bytes": 10**12, "min_days_left": 30})
    with freeze_time(NOW):
        _load(env, 100, age_ms=3_600_000, seed=2)
        size = report(env)["db_bytes"]
        earlier = {"db_bytes": size - 7_000_000}
        with env.DB.transaction() as conn:
            conn.execute(
                job_runs.insert().values(
                    job="monitor", scheduled_for=0, attempt=1, status="succeeded", holder="h",
                    started_at=clock.now_s() - 7 * 86400, finished_at=clock.now_s() - 7 * 86400,
                    result=orjson.dumps(earlier).decode(),
                )
            )  # fmt: skip
        r = report(env)
    grown = r["db_bytes"] - earlier["db_bytes"]  # 7 MB, plus what the job_runs row itself took
    assert 7_000_000 <= grown < 7_100_000
    assert r["growth_bytes_per_day"] == round(grown / 7)
    assert r["growth_7d_bytes"] == grown
    assert r["days_until_full"] == round((10**12 - r["db_bytes"]) / (grown / 7), 1)
    assert r["alerts"] == []


def test_thresholds_raise_alerts_and_check_exits_non_zero(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, monitor={"capacity_bytes": 1000, "max_queue_depth": 2})
    with freeze_time(NOW):
        _load(env, 50, age_ms=6 * DAY_MS, seed=3)  # older than retention (3 d) + 1 d, not archived
        env.QUEUE.send_batch([{"id": "y"}] * 3)
        r = report(env)
        checked = _cli(env, "monitor", "--check", "--json")
        table = _cli(env, "monitor")
    kinds = sorted(a.split(":")[0] for a in r["alerts"])
    assert kinds == ["archive_lag", "capacity", "queue"]
    assert checked.exit_code == 1
    assert orjson.loads(checked.stdout)["alerts"] == r["alerts"]
    assert table.exit_code == 0 and "ALERT archive_lag" in table.output and "traffic_events" in table.output


def test_check_exits_0_when_healthy(env: Any) -> None:
    with freeze_time(NOW):
        _load(env, 20, age_ms=3_600_000, seed=4)
        result = _cli(env, "monitor", "--check")
    assert result.exit_code == 0, result.output


def test_monitor_job_stores_its_report_in_the_run(env: Any) -> None:
    with freeze_time(NOW):
        _load(env, 40, age_ms=3_600_000, seed=5)
        out = run_by_hand(env, "monitor", None)
    assert out.status == "succeeded"
    with env.DB.read() as conn:
        stored = conn.execute(sa.select(job_runs.c.result).where(job_runs.c.job == "monitor")).scalar_one()
    assert orjson.loads(stored)["rows"]["traffic_events"] == 40


def test_status_reports_dead_and_stuck_workers(env: Any) -> None:
    with freeze_time(NOW) as frozen:
        assert worker_status(env.DB)["healthy"] is False  # no worker at all
        live = Heartbeat(env.DB, "host:1:aa")
        live.beat(force=True)
        assert _cli(env, "status").exit_code == 0
        quiet = Heartbeat(env.DB, "host:2:bb")
        quiet.beat(force=True)
        frozen.tick(60)
        live.beat(force=True)
        assert {w["verdict"] for w in worker_status(env.DB)["workers"]} == {"ok"}  # 60 s: not dead yet
        frozen.tick(61)
        live.batch_done()
        live.beat(force=True)
        s = worker_status(env.DB)
        verdicts = {w["holder"]: w["verdict"] for w in s["workers"]}
        assert verdicts == {"host:1:aa": "ok", "host:2:bb": "dead"}
        assert s["healthy"]  # one dead worker beside a live one
        result = _cli(env, "status", "--json")
        assert result.exit_code == 0 and orjson.loads(result.stdout)["workers"][1]["verdict"] == "dead"
        quiet.beat("stopped", force=True)
        frozen.tick(400)
        live.beat(force=True)  # alive, but no batch for 400 s while messages wait
        env.QUEUE.send_batch([{"id": "z"}])
        s = worker_status(env.DB, env.QUEUE.depth())
        assert [(w["holder"], w["verdict"]) for w in s["workers"]] == [("host:1:aa", "stuck"), ("host:2:bb", "stopped")]
        assert not s["healthy"]


def test_dead_workers_are_forgotten(env: Any) -> None:
    """A SIGKILLed worker's row (never written `stopped`) does not make `status` fail for
    good: it is dead after `[worker] dead_after`, listed until `forget_after`, and
    `status --forget-dead` drops it at once."""
    with freeze_time(NOW) as frozen:
        killed = Heartbeat(env.DB, "host:3:cc")
        killed.beat(force=True)
        frozen.tick(3600)
        live = Heartbeat(env.DB, "host:4:dd")
        live.beat(force=True)
        assert [w["verdict"] for w in worker_status(env.DB)["workers"]] == ["dead", "ok"]
        frozen.tick(86_400 - 3600 + 1)  # the dead row is now older than forget_after
        live.beat(force=True)
        assert [w["holder"] for w in worker_status(env.DB)["workers"]] == ["host:4:dd"]
        killed.beat(force=True)  # another dead one, recent
        frozen.tick(200)
        live.beat(force=True)
        result = _cli(env, "status", "--forget-dead", "--json")
        assert result.exit_code == 0
        assert [w["holder"] for w in orjson.loads(result.stdout)["workers"]] == ["host:4:dd"]
        assert "forgot 1 dead workers" in result.stderr
        assert [w["holder"] for w in worker_status(env.DB)["workers"]] == ["host:4:dd"]
