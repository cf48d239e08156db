"""The worker process: the durable batch counter and background snapshot refresh (driven
step by step), then real `edgepipe worker` processes — two on one database (SQLite file
and PostgreSQL) running every job once per slot and no batch twice, and SIGTERM mid-batch
losing nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import snapshots
from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.cli.compose import consumer_worker
from pipeline.env import Env
from pipeline.schema import counters, job_runs, traffic_events, worker_heartbeats
from pipeline.worker import BATCH_COUNTER
from tests.conftest import MakeEnv
from tests.support import refreshing_worker
from tests.traffic_truth import assert_aggregates_equal, expected_aggregates, make_events

DEADLINE_S = 90
NO_FLOOR = {"min_interval_s": 0}


def _counter(env: Env) -> int:
    with env.DB.read() as conn:
        return conn.execute(sa.select(counters.c.value).where(counters.c.name == BATCH_COUNTER)).scalar() or 0


def _enqueue(env: Env, n: int, seed: int = 4) -> list[Any]:
    pairs = make_events(seed=seed, n=n, now_ms=clock.now_ms() - 60_000, span_ms=6 * 3600_000)
    env.QUEUE.send_batch([b for b, _ in pairs])
    return [t for _, t in pairs]


# -- in-process, step by step --------------------------------------------------------------


def test_counter_is_durable_and_refresh_runs_every_n_batches(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 10, "snapshot_every_batches": 3}, snapshots=NO_FLOOR)
    _enqueue(env, 100)
    worker = consumer_worker(env)
    for _ in range(7):
        assert worker.step(wait=0).ok
        worker.drain()  # let each refresh finish (one still running when the next is due is skipped)
    assert _counter(env) == 7
    assert worker.side.refreshes == 2
    assert [v["version"] for v in snapshots.list_versions(env.KV)] == [1, 2]

    restarted = consumer_worker(env)  # a new process: the count goes on
    assert restarted.run(until_empty=True) == 3
    restarted.drain()
    assert _counter(env) == 10
    assert restarted.side.refreshes == 1  # at batch 9, not at its own 3rd batch
    assert snapshots.read_latest(env.KV)["version"] == 3


def test_failed_batch_does_not_advance_the_counter(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url, consumer={"max_batch_size": 10, "snapshot_every_batches": 1}, snapshots=NO_FLOOR)
    _enqueue(env, 20)

    def broken(batch: Any, env: Any, ctx: Any) -> None:
        TrafficConsumer(env.config).handle_batch(batch, env, ctx)
        raise RuntimeError("injected after the writes")

    def fine(batch: Any, env: Any, ctx: Any) -> None:
        TrafficConsumer(env.config).handle_batch(batch, env, ctx)

    assert refreshing_worker(env, handler=fine).step(wait=0).ok
    assert _counter(env) == 1  # the counter runs
    result = refreshing_worker(env, handler=broken).step(wait=0)
    assert result is not None and not result.ok
    assert _counter(env) == 1
    with env.DB.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(traffic_events)).scalar_one() == 10  # the first


def test_failing_refresh_never_fails_or_delays_the_batch(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url, consumer={"max_batch_size": 10, "snapshot_every_batches": 1}, snapshots=NO_FLOOR)
    truths = _enqueue(env, 50)
    calls: list[int] = []

    def failing_refresh(env: Any) -> None:
        calls.append(1)
        raise RuntimeError("KV is down")

    worker = refreshing_worker(env, failing_refresh)
    assert worker.run(until_empty=True) == 5
    worker.drain()
    assert calls and worker.side.refreshes == 0
    assert _counter(env) == 5
    assert_aggregates_equal(env.DB, expected_aggregates(truths))


def test_refresh_runs_off_the_critical_path(sqlite_url: str, make_env: MakeEnv) -> None:
    """The batch returns while its refresh is still blocked in the background; a refresh
    due while one is running is skipped, not queued."""
    import threading

    env = make_env(sqlite_url, consumer={"max_batch_size": 10, "snapshot_every_batches": 1}, snapshots=NO_FLOOR)
    _enqueue(env, 30)
    release = threading.Event()
    started = threading.Event()

    def slow_refresh(env: Any) -> None:
        started.set()
        release.wait(timeout=60)

    worker = refreshing_worker(env, slow_refresh)
    try:
        assert worker.step(wait=0).ok
        assert started.wait(timeout=30)
        assert worker.step(wait=0).ok  # not blocked by the refresh in progress
        assert worker.step(wait=0).ok
    finally:
        release.set()
        worker.drain()
    assert worker.side.refreshes == 1
    assert _counter(env) == 3


# -- real worker processes -----------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a worker exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling interval of external processes, not a wait for work


class Procs:
    def __init__(self, tmp: Path, db_url: str, config: str) -> None:
        self.tmp = tmp
        (tmp / "edgepipe.toml").write_text(config)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")} | {
            "EDGEPIPE_CONFIG": str(tmp / "edgepipe.toml"),
            "EDGEPIPE_BINDINGS__DB": db_url,
            "EDGEPIPE_BINDINGS__ARCHIVE": f"file://{tmp / 'archive'}",
            "EDGEPIPE_CLEANER__STATS_FILE": str(tmp / "stats.json"),
        }

    def start(self) -> subprocess.Popen[bytes]:
        with (self.tmp / f"worker{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker"], cwd=self.tmp, env=self.environ, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, i: int) -> str:
        return (self.tmp / f"worker{i}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for i, p in enumerate(self.procs):
            try:
                code = p.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                pytest.fail("a worker did not stop after SIGTERM")
            assert code == 0, self.log(i)[-3000:]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture
def procs_factory(tmp_path: Path) -> Iterator[Callable[[str, str], Procs]]:
    made: list[Procs] = []

    def make(db_url: str, config: str) -> Procs:
        made.append(Procs(tmp_path, db_url, config))
        return made[-1]

    yield make
    for p in made:
        p.kill_all()


EVERY_MINUTE = """
[consumer]
max_batch_size = 50
max_batch_timeout = 0.2
snapshot_every_batches = 5

[schedule]
tick_seconds = 1
lease_seconds = 10
jobs = { monitor = "* * * * *", snapshot_prune = "* * * * *" }
"""


def _runs(env: Env) -> list[Any]:
    with env.DB.read() as conn:
        return conn.execute(sa.select(job_runs)).all()


def _batch_lines(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"event=batch messages=(\d+) ok=True", text)]


@pytest.mark.slow
def test_two_workers_run_each_job_once_per_slot_and_no_batch_twice(
    db_url: str, make_env: MakeEnv, procs_factory: Callable[[str, str], Procs]
) -> None:
    env = make_env(db_url)
    truths = _enqueue(env, 6000, seed=31)
    procs = procs_factory(db_url, EVERY_MINUTE)
    first, second = procs.start(), procs.start()
    started_slot = clock.now_s() // 60 * 60

    def done() -> bool:
        s = env.QUEUE.stats()
        ok = {r.job for r in _runs(env) if r.status == "succeeded" and r.scheduled_for >= started_slot}
        return s["pending"] == 0 and s["in_flight"] == 0 and ok == {"monitor", "snapshot_prune"}

    try:
        wait_for(done, "the queue to drain and both jobs to run", [first, second])
        procs.stop_all()
    finally:
        procs.kill_all()

    runs = _runs(env)
    per_slot = Counter((r.job, r.scheduled_for) for r in runs)
    assert per_slot and all(n == 1 for n in per_slot.values()), per_slot
    assert {r.status for r in runs} == {"succeeded"}
    assert {r.attempt for r in runs} == {1}

    logs = [procs.log(0), procs.log(1)]
    batches = [_batch_lines(t) for t in logs]
    assert sum(sum(b) for b in batches) == len(truths), "a message was processed twice (or lost)"
    assert sum(len(b) for b in batches) == _counter(env)
    assert_aggregates_equal(env.DB, expected_aggregates(truths))
    with env.DB.read() as conn:
        beats = conn.execute(sa.select(worker_heartbeats)).all()
    assert len(beats) == 2 and {b.state for b in beats} == {"stopped"}
    assert sum(b.batches for b in beats) == _counter(env)
    assert snapshots.read_latest(env.KV) is not None


@pytest.mark.slow
def test_sigterm_mid_batch_loses_nothing(
    sqlite_url: str, make_env: MakeEnv, procs_factory: Callable[[str, str], Procs]
) -> None:
    env = make_env(sqlite_url)
    truths = _enqueue(env, 20000, seed=32)
    config = "[consumer]\nmax_batch_size = 1000\nmax_batch_timeout = 0\nvisibility_timeout = 2\n"
    procs = procs_factory(sqlite_url, config)
    proc = procs.start()

    def consumed() -> int:
        with env.DB.read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(traffic_events)).scalar_one()

    try:
        wait_for(lambda: consumed() > 0, "the first committed batch", [proc])
        proc.send_signal(signal.SIGTERM)  # the worker is busy: this lands while a batch is in hand
        assert proc.wait(timeout=DEADLINE_S) == 0, procs.log(0)[-3000:]
    finally:
        procs.kill_all()
    stats = env.QUEUE.stats()
    assert stats["in_flight"] == 0, "a batch was left leased"
    done = consumed()
    assert 0 < done < len(truths)
    assert done + stats["pending"] == len(truths)
    assert "event=stopping signal=SIGTERM" in procs.log(0)
    assert "event=worker_stopped" in procs.log(0)

    consumer_worker(env).run(until_empty=True)
    assert consumed() == len(truths)
    assert_aggregates_equal(env.DB, expected_aggregates(truths))


def test_refreshes_are_at_least_min_interval_apart(sqlite_url: str, make_env: MakeEnv) -> None:
    from freezegun import freeze_time

    env = make_env(
        sqlite_url, consumer={"max_batch_size": 10, "snapshot_every_batches": 1}, snapshots={"min_interval_s": 5}
    )
    with freeze_time(clock.now()) as frozen:
        _enqueue(env, 60)
        worker = consumer_worker(env)
        for _ in range(3):
            assert worker.step(wait=0).ok
            worker.drain()
        assert worker.side.refreshes == 1
        frozen.tick(5)
        assert worker.step(wait=0).ok
        worker.drain()
        assert worker.side.refreshes == 2
    assert _counter(env) == 4
