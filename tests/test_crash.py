"""A real `edgepipe worker` process, killed with SIGKILL mid-stream and restarted, or stopped
with SIGTERM: nothing is lost, nothing counts twice, only the poison ends in the DLQ.

The test process enqueues and reads the same SQLite file; it polls (with a deadline) for
the worker's progress instead of sleeping for a fixed time."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline import clock
from pipeline.env import Env
from pipeline.schema import traffic_events
from tests.conftest import MakeEnv, queue_url
from tests.support import scratch_db
from tests.traffic_truth import assert_aggregates_equal, expected_aggregates, make_events

pytestmark = pytest.mark.slow

DEADLINE_S = 90
GOOD = {"ts": 1_700_000_000_000, "method": "GET", "path": "/", "status": 200, "response_time_ms": 1}
POISON = [GOOD | {"id": "p1", "ts": "soon"}, GOOD | {"id": "p2", "status": 999}, "not an event"]


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until `condition()` holds; fail after the deadline or if `proc` died."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)  # polling interval of an external process, not a wait for work


class Workers:
    """Starts `edgepipe worker` processes on one database; kills leftovers at teardown."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")} | {
            "EDGEPIPE_BINDINGS__DB": db_url,
            "EDGEPIPE_BINDINGS__ARCHIVE": f"file://{tmp / 'archive'}",
            "EDGEPIPE_CLEANER__STATS_FILE": str(tmp / "stats.json"),
            "EDGEPIPE_CONSUMER__VISIBILITY_TIMEOUT": "2",
            "EDGEPIPE_CONSUMER__MAX_BATCH_TIMEOUT": "0",
            "EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "25",
        }

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "worker"],
            cwd=self.tmp,
            env=self.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"worker{self.procs.index(proc)}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def workers(tmp_path: Path, sqlite_url: str) -> Iterator[Workers]:
    w = Workers(tmp_path, sqlite_url)
    yield w
    w.close()


def consumed(env: Env) -> int:
    with env.DB.read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(traffic_events)).scalar_one()


def enqueue(env: Env, n: int, seed: int) -> list[Any]:
    """n unique events (a third sent two or three times, shuffled) and the poison."""
    pairs = make_events(seed=seed, n=n, now_ms=clock.now_ms() - 60_000, span_ms=86_400_000)
    rng = random.Random(seed)
    bodies: list[Any] = [b for b, _ in pairs for _ in range(rng.choice((2, 3)) if rng.random() < 1 / 3 else 1)]
    bodies += POISON
    rng.shuffle(bodies)
    env.QUEUE.send_batch(bodies)
    return [t for _, t in pairs]


def drained(env: Env) -> bool:
    s = env.QUEUE.stats()
    return s["pending"] == 0 and s["in_flight"] == 0


def stop(proc: subprocess.Popen[bytes], workers: Workers) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail("worker did not stop after SIGTERM")
    assert code == 0, workers.log(proc)


def assert_final_state(env: Env, truths: list[Any]) -> None:
    assert consumed(env) == len(truths)
    assert_aggregates_equal(env.DB, expected_aggregates(truths))
    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["in_flight"], stats["dlq"]) == (0, 0, len(POISON))
    assert stats.get("dlq_invalid") == len(POISON)
    errors = sorted(d["error"].split(":", 1)[0] for d in env.QUEUE.dlq_list())
    assert errors == ["event", "status", "ts"]


def test_sigkill_mid_stream_then_restart(workers: Workers, sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)
    truths = enqueue(env, 6000, seed=21)

    first = workers.start()
    wait_for(lambda: consumed(env) > 0, "the first committed batch", first)
    first.kill()  # SIGKILL: no cleanup, possibly holding a leased batch
    first.wait(timeout=30)
    done = consumed(env)
    assert 0 < done < len(truths), "the worker was not killed mid-stream"

    second = workers.start()
    wait_for(lambda: drained(env), "the restarted worker to drain the queue", second)
    stop(second, workers)
    assert_final_state(env, truths)


def test_sigterm_finishes_the_batch_in_hand_and_exits_0(workers: Workers, sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)
    truths = enqueue(env, 4000, seed=22)

    proc = workers.start()
    wait_for(lambda: consumed(env) > 0, "the first committed batch", proc)
    stop(proc, workers)
    # nothing is left leased: the batch in hand was committed and acked before exiting
    assert env.QUEUE.stats()["in_flight"] == 0
    assert consumed(env) > 0

    again = workers.start()
    wait_for(lambda: drained(env), "the queue to drain", again)
    stop(again, workers)
    assert_final_state(env, truths)


@pytest.fixture(params=["db", "sqs", "redis"])
def pg_queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(a PostgreSQL scratch database URL, a queue URL) for each queue backend."""
    with scratch_db(request.getfixturevalue("pg_server_url"), tmp_path) as db, queue_url(request, request.param) as q:
        yield db, q


@pytest.mark.postgres
def test_sigkill_one_of_three_workers_on_each_queue_backend(
    pg_queue_url: tuple[str, str], tmp_path: Path, make_env: MakeEnv
) -> None:
    """Three workers on one PostgreSQL database; one is killed mid-stream and restarted:
    nothing is lost and nothing counts twice, whichever queue carries the events."""
    db, queue = pg_queue_url
    env = make_env(db, bindings={"queue": queue})
    env.QUEUE.ensure()
    # moto's SQS server slows down with the queue's length (it recounts the queue on every
    # call): a smaller stream there, still many batches of 25
    truths = enqueue(env, 400 if queue.startswith("sqs:") else 3000, seed=23)
    workers = Workers(tmp_path, db)
    workers.environ["EDGEPIPE_BINDINGS__QUEUE"] = queue  # (AWS_* test credentials come from os.environ)
    if queue.startswith("sqs:"):  # a batch of 25 takes moto's server a few seconds: leases must outlast it
        workers.environ["EDGEPIPE_CONSUMER__VISIBILITY_TIMEOUT"] = "15"
    try:
        first, *_others = [workers.start() for _ in range(3)]
        wait_for(lambda: consumed(env) > 0, "the first committed batch", first)
        first.kill()
        first.wait(timeout=30)
        assert consumed(env) < len(truths), "the worker was not killed mid-stream"
        workers.start()
        wait_for(lambda: drained(env) and consumed(env) == len(truths), "the workers to drain the queue")
        for proc in workers.procs[1:]:
            stop(proc, workers)
    finally:
        workers.close()
    assert_final_state(env, truths)
