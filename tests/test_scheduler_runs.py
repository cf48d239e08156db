"""The scheduler against a real database (SQLite and PostgreSQL): leases, runs recorded
once per slot, missed-run catch-up, failures recorded and retried with backoff, a dead
worker's run retried, and `jobs run` / `jobs list` / `jobs history` through the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

from pipeline.errors import TransientError
from pipeline.jobruns import JobStore
from pipeline.jobs import JOBS, job
from scheduler.runner import execute, run_by_hand
from scheduler.service import JobScheduler
from tests.conftest import run_cli

calls: list[tuple[str, datetime, bool]] = []
OFF = {"archive": "off", "clean": "off", "monitor": "off", "snapshot_prune": "off", "rollup": "off", "expire": "off"}
failures_left = {"n": 0}


@pytest.fixture(autouse=True)
def test_jobs() -> Iterator[None]:
    """Two jobs that exist only for these tests: one that counts calls, one that fails
    the first `failures_left` times."""

    @job("probe")
    def probe(env: Any, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
        calls.append(("probe", scheduled_for, dry_run))
        return {"calls": len(calls)}

    @job("flaky")
    def flaky(env: Any, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
        calls.append(("flaky", scheduled_for, dry_run))
        if failures_left["n"] > 0:
            failures_left["n"] -= 1
            raise RuntimeError("disk on fire")
        return {"ok": True}

    calls.clear()
    failures_left["n"] = 0
    yield
    JOBS.pop("probe", None)
    JOBS.pop("flaky", None)


@pytest.fixture
def sched_env(db_url: str, make_env: Any) -> Any:
    return make_env(db_url, schedule={"jobs": OFF | {"probe": "0 2 * * *", "flaky": "0 3 * * *"}, "retry_backoff": 60})


def test_lease_is_exclusive_until_released_or_expired(sched_env: Any) -> None:
    store = JobStore(sched_env.DB)
    with freeze_time("2026-11-20T02:00:00Z") as frozen:
        assert store.acquire("probe", "a", 30)
        assert not store.acquire("probe", "b", 30)
        assert store.acquire("probe", "a", 30)  # re-entrant for its holder
        assert store.renew("probe", "a", 30) and not store.renew("probe", "b", 30)
        frozen.tick(31)
        assert store.acquire("probe", "b", 30)  # expired: taken over
        assert not store.renew("probe", "a", 30)
        store.release("probe", "a")  # not the holder: no effect
        assert not store.acquire("probe", "c", 30)
        store.release("probe", "b")
        assert store.acquire("probe", "c", 30)


def test_scheduled_slot_runs_once_even_when_ticked_by_two_schedulers(sched_env: Any) -> None:
    a, b = JobScheduler(sched_env, "worker-a"), JobScheduler(sched_env, "worker-b")
    with freeze_time("2026-11-20T02:00:00.5Z") as frozen:
        outcomes = a.tick() + b.tick()
        frozen.tick(30)
        outcomes += b.tick() + a.tick()
    assert [(o.job, o.status) for o in outcomes] == [("probe", "succeeded")]
    assert calls == [("probe", datetime(2026, 11, 20, 2, 0, tzinfo=UTC), False)]
    (run,) = JobStore(sched_env.DB).history()
    assert (run["job"], run["scheduled_for"], run["status"], run["attempt"]) == (
        "probe", "2026-11-20T02:00:00Z", "succeeded", 1,
    )  # fmt: skip
    assert run["result"] == {"calls": 1} and run["holder"] == "worker-a"


def test_a_held_lease_makes_the_other_scheduler_skip(sched_env: Any) -> None:
    store = JobStore(sched_env.DB)
    with freeze_time("2026-11-20T02:00:01Z"):
        assert store.acquire("probe", "someone-else", 300)
        assert [o.status for o in JobScheduler(sched_env, "me").tick()] == ["skipped"]
        assert calls == [] and store.history() == []


def test_missed_run_catches_up_once_at_startup_within_grace(sched_env: Any) -> None:
    with freeze_time("2026-11-20T02:45:00Z"):  # the worker was down at 02:00
        first = JobScheduler(sched_env, "w").tick()
        again = JobScheduler(sched_env, "w2").tick()
    assert [(o.job, o.status, o.scheduled_for.hour) for o in first] == [("probe", "succeeded", 2)]
    assert again == []
    with freeze_time("2026-11-21T03:30:00Z"):  # next day: probe's slot is past its grace
        assert [o.job for o in JobScheduler(sched_env, "w").tick()] == ["flaky"]
    assert [c[0] for c in calls] == ["probe", "flaky"]


def _only(name: str, outcomes: list[Any]) -> list[Any]:
    return [o for o in outcomes if o.job == name]


def test_failure_is_recorded_and_retried_with_backoff(sched_env: Any) -> None:
    failures_left["n"] = 2
    sched = JobScheduler(sched_env, "w")
    with freeze_time("2026-11-20T03:00:00Z") as frozen:
        (first,) = _only("flaky", sched.tick())
        assert (first.status, first.attempt, first.error) == ("failed", 1, "RuntimeError: disk on fire")
        frozen.tick(30)
        assert _only("flaky", sched.tick()) == []  # backoff 60 s not over
        frozen.tick(31)
        (second,) = _only("flaky", sched.tick())
        assert (second.status, second.attempt) == ("failed", 2)
        frozen.tick(119)
        assert _only("flaky", sched.tick()) == []  # backoff doubled
        frozen.tick(2)
        (third,) = _only("flaky", sched.tick())
        assert (third.status, third.attempt) == ("succeeded", 3)
        frozen.tick(3600)
        assert _only("flaky", sched.tick()) == []
    history = JobStore(sched_env.DB).history("flaky")
    assert [(h["attempt"], h["status"]) for h in history] == [(3, "succeeded"), (2, "failed"), (1, "failed")]
    assert history[2]["error"] == "RuntimeError: disk on fire"


def test_gives_up_after_max_attempts(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, schedule={"jobs": OFF | {"flaky": "0 3 * * *"}, "retry_backoff": 0, "max_attempts": 2})
    failures_left["n"] = 10
    sched = JobScheduler(env, "w")
    with freeze_time("2026-11-20T03:00:00Z") as frozen:
        outcomes = []
        for _ in range(5):
            outcomes += sched.tick()
            frozen.tick(1)
    assert [(o.attempt, o.status) for o in outcomes] == [(1, "failed"), (2, "failed")]


def test_run_of_a_dead_worker_is_abandoned_and_retried(sched_env: Any) -> None:
    store = JobStore(sched_env.DB)
    with freeze_time("2026-11-20T02:00:00Z") as frozen:
        slot = datetime(2026, 11, 20, 2, 0, tzinfo=UTC).timestamp()
        assert store.acquire("probe", "dead", 300)
        store.start("probe", slot, 1, "dead")  # then the process vanished, lease and all
        frozen.tick(60)
        assert JobScheduler(sched_env, "w").tick() == []  # its lease still runs
        frozen.tick(300)
        outcomes = JobScheduler(sched_env, "w").tick()  # lease expired: marked abandoned now
        frozen.tick(61)
        outcomes += JobScheduler(sched_env, "w").tick()  # and retried after the backoff
    assert [(o.attempt, o.status) for o in outcomes] == [(0, "skipped"), (2, "succeeded")]
    statuses = [(h["attempt"], h["status"]) for h in store.history("probe")]
    assert statuses == [(2, "succeeded"), (1, "abandoned")]


def test_run_by_hand_is_recorded_and_refused_while_leased(sched_env: Any) -> None:
    at = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    out = run_by_hand(sched_env, "probe", at)
    assert (out.status, out.attempt) == ("succeeded", 1)
    assert run_by_hand(sched_env, "probe", at).attempt == 2  # same slot again: a new attempt
    dry = run_by_hand(sched_env, "probe", at, dry_run=True)
    assert dry.status == "dry_run" and calls[-1][2] is True
    store = JobStore(sched_env.DB)
    store.acquire("probe", "busy-worker", 300)
    with pytest.raises(TransientError, match="busy-worker"):
        run_by_hand(sched_env, "probe", at)
    store.release("probe", "busy-worker")
    # the scheduler counts the hand-made success for the slot and does not run it again
    with freeze_time("2026-11-20T02:00:30Z"):
        assert JobScheduler(sched_env, "w").tick() == []
    skipped = execute(sched_env, store, "probe", at, "w", recheck=lambda: None)
    assert skipped.status == "skipped"


def _cli(env: Any, *args: str) -> Any:
    schedule = {
        "EDGEPIPE_SCHEDULE__JOBS": '{probe = "0 2 * * *", flaky = "0 5 * * 0"}',
        "EDGEPIPE_SCHEDULE__TIMEZONE": "Europe/Paris",
    }
    return run_cli(env, *args, environ=schedule)


def test_cli_jobs_run_list_and_history(sched_env: Any) -> None:
    failures_left["n"] = 1
    with freeze_time("2026-11-20T12:00:00Z"):
        ok = _cli(sched_env, "jobs", "run", "probe", "--at", "2026-11-20T01:00:00Z", "--json")
        assert ok.exit_code == 0, ok.output
        assert orjson.loads(ok.stdout) == {"calls": 1}
        failed = _cli(sched_env, "jobs", "run", "flaky")
        assert failed.exit_code == 1 and "disk on fire" in failed.output
        unknown = _cli(sched_env, "jobs", "run", "nope")
        assert unknown.exit_code == 5 and "unknown job 'nope'" in unknown.output
        listed = orjson.loads(_cli(sched_env, "jobs", "list", "--json").stdout)
        history = orjson.loads(_cli(sched_env, "jobs", "history", "--json").stdout)
        assert _cli(sched_env, "jobs", "list").exit_code == 0
    rows = {r["job"]: r for r in listed}
    assert rows["probe"]["next_run"] == "2026-11-21T01:00:00Z"  # 02:00 in Paris (UTC+1)
    assert rows["flaky"]["next_run_local"] == "2026-11-22T05:00:00+01:00"  # a Sunday
    assert rows["probe"]["last_status"] == "succeeded" and rows["flaky"]["last_status"] == "failed"
    assert rows["flaky"]["timezone"] == "Europe/Paris" and rows["flaky"]["cron"] == "0 5 * * 0"
    assert [(h["job"], h["status"]) for h in history] == [("flaky", "failed"), ("probe", "succeeded")]
    assert history[1]["scheduled_for"] == "2026-11-20T01:00:00Z"


def test_stop_lets_the_run_in_hand_finish_releases_the_lease_and_starts_nothing_new(sched_env: Any) -> None:
    import threading

    entered, release = threading.Event(), threading.Event()

    @job("a_slow")
    def slow(env: Any, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
        entered.set()
        assert release.wait(timeout=30)
        return {"finished": True}

    env = sched_env.__class__(
        sched_env.config.replace(schedule={"jobs": {"a_slow": "* * * * *", "probe": "* * * * *"}}),
        sched_env.DB, sched_env.QUEUE, sched_env.KV, sched_env.ARCHIVE,
    )  # fmt: skip
    sched = JobScheduler(env, "w")
    store = JobStore(env.DB)
    try:
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.extend(sched.tick()))
        thread.start()
        assert entered.wait(timeout=30)
        assert "a_slow" in store.leases()
        sched.stopping.set()  # what the first SIGTERM does
        release.set()
        thread.join(timeout=30)
    finally:
        release.set()
        JOBS.pop("a_slow", None)
    assert [(o.job, o.status) for o in result] == [("a_slow", "succeeded")]  # probe (due next) was not started
    assert store.leases() == {}
    assert sched.tick() == []
    assert [c[0] for c in calls] == []
