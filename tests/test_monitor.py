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


# --- alerts: each raised by a constructed situation, with its figure, and cleared ---------


def _raised(env: Any, name: str) -> list[dict[str, Any]]:
    return [a for a in report(env)["raised"] if a["name"] == name]


def test_archive_lag_counts_the_late_rows_and_clears_when_archived(env: Any) -> None:
    with freeze_time(NOW):
        _load(env, 30, age_ms=6 * DAY_MS, seed=11)
        _load(env, 10, age_ms=DAY_MS, seed=12)  # recent rows are no lag
        (alert,) = _raised(env, "archive_lag")
        assert alert["value"] == 30 and "30 rows older than 4 days" in alert["message"]
        assert run_by_hand(env, "archive", None).status == "succeeded"
        assert _raised(env, "archive_lag") == []


def test_clean_lag_from_old_verified_rows_and_from_a_run_out_of_time(db_url: str, make_env: Any) -> None:
    archive = {"max_rows_per_object": 10}
    hurried = make_env(db_url, archive=archive, cleaner={"batch_size": 10, "max_run_seconds": 1e-9})
    with freeze_time(NOW) as frozen:
        _load(hurried, 60, age_ms=5 * DAY_MS, seed=13)
        run_by_hand(hurried, "archive", None)
        assert _raised(hurried, "clean_lag") == []  # verified just now, not cleaned yet: no lag
        out = run_by_hand(hurried, "clean", None)
        assert out.result is not None and out.result["complete"] is False
        left = out.result["remaining_rows"]
        assert 0 < left < 60
        (alert,) = _raised(hurried, "clean_lag")
        assert alert["value"] == left and "out of time" in alert["message"]
        frozen.tick(2 * 86_400)
        (alert,) = _raised(hurried, "clean_lag")
        assert alert["value"] == left and "more than a day ago" in alert["message"]
        unhurried = make_env(db_url, archive=archive)  # the same database, the default time budget
        out = run_by_hand(unhurried, "clean", None)
        assert out.result is not None and out.result["complete"] is True and out.result["remaining_rows"] == 0
        assert _raised(unhurried, "clean_lag") == []


def test_queue_age(env: Any) -> None:
    with freeze_time(NOW) as frozen:
        env.QUEUE.send_batch([b for b, _ in make_events(seed=14, n=5, now_ms=clock.now_ms(), span_ms=60_000)])
        assert _raised(env, "queue_age") == []
        frozen.tick(7200)
        (alert,) = _raised(env, "queue_age")
        assert alert["value"] == 7200.0 and alert["limit"] == 3600
        Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)
        assert _raised(env, "queue_age") == []


def test_dlq_depth_and_growth(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, monitor={"max_dlq_depth": 3, "max_dlq_growth": 2})

    def poison(n: int) -> None:
        env.QUEUE.send_batch([{"id": f"bad-{clock.now_s()}-{i}", "status": 99} for i in range(n)])
        Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)

    with freeze_time(NOW) as frozen:
        poison(5)
        (alert,) = _raised(env, "dlq")
        assert alert["value"] == 5 and alert["limit"] == 3
        run_by_hand(env, "monitor", None)  # its stored report is the growth's reference
        assert env.QUEUE.dlq_purge() == 5
        assert _raised(env, "dlq") == []  # purged; no growth known yet
        frozen.tick(86_400)
        poison(4)
        env.QUEUE.dlq_purge()
        (alert,) = _raised(env, "dlq")
        assert alert["value"] == 4.0 and "4 dead letters a day" in alert["message"]
        run_by_hand(env, "monitor", None)
        frozen.tick(86_400)
        assert _raised(env, "dlq") == []  # nothing new for a day


def test_no_worker_once_every_worker_seen_is_gone(env: Any) -> None:
    with freeze_time(NOW) as frozen:
        assert _raised(env, "no_worker") == []  # none ever seen (jobs run by cron, `consume` by hand)
        beat = Heartbeat(env.DB, "host:9:zz")
        beat.beat(force=True)
        assert _raised(env, "no_worker") == []
        frozen.tick(200)  # past dead_after (120 s)
        (alert,) = _raised(env, "no_worker")
        assert alert["value"] == 0 and "1 workers" in alert["message"]
        beat.beat(force=True)
        assert _raised(env, "no_worker") == []


def test_job_missed_and_job_failed(env: Any) -> None:
    from pipeline import meta
    from pipeline.jobruns import JobStore

    with freeze_time("2026-11-20T01:30:00Z"):  # after the 01:00 backup slot
        meta.ensure_deployment_start(env.DB)
    with freeze_time("2026-11-20T03:30:00Z"):
        r = report(env)
        assert r["jobs"]["archive"]["status"] == "missed"  # 02:00 passed more than misfire_grace ago
        assert r["jobs"]["clean"]["status"] == "pending"  # 03:00, still within grace
        assert "monitor" not in r["jobs"]  # its last slot (yesterday 04:00) predates the deployment
        (alert,) = _raised(env, "job_missed")
        assert alert["value"] == "archive" and alert["limit"] == "2026-11-20T02:00:00Z"
        assert run_by_hand(env, "archive", None).status == "succeeded"  # a run by hand covers the slot
        assert _raised(env, "job_missed") == []
        store = JobStore(env.DB)
        run_id = store.start("clean", clock.parse_time("2026-11-20T03:00:00Z"), 1, "host:1:aa")
        assert run_id is not None
        store.finish(run_id, "failed", error="OSError: disk gone")
        (alert,) = _raised(env, "job_failed")
        assert alert["value"] == "clean" and "1 attempts" in alert["message"]
        result = _cli(env, "monitor", "--check", "--json")
        assert result.exit_code == 1 and "job_failed" in {a["name"] for a in orjson.loads(result.stdout)["raised"]}
        assert run_by_hand(env, "clean", None).status == "succeeded"
        assert _raised(env, "job_failed") == []
