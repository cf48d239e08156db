"""A failure inside a batch's transaction never takes valid events with it: a poison message
is found by splitting the batch and dead-lettered alone with the real error; a transient
fault (a full disk, a lock, a dropped connection) dead-letters nothing and counts no
delivery, and the worker resumes when it clears. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from consumers.traffic import TrafficConsumer
from pipeline.env import Env
from pipeline.heartbeat import Heartbeat
from pipeline.heartbeat import status as worker_status
from pipeline.schema import queue_messages
from pipeline.worker import Worker
from tests.conftest import MakeEnv
from tests.faults import NOW, DiskFull, refuse_id, send_events
from tests.traffic_truth import assert_aggregates_equal, expected_aggregates


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as f:
        yield f


def _attempts(env: Env) -> set[int]:
    with env.DB.read() as conn:
        return set(conn.execute(sa.select(queue_messages.c.attempts)).scalars())


def test_one_poison_in_a_batch_of_1000(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 1000})
    pairs = send_events(env, 1000, 3)
    _, poison = pairs[617]
    refuse_id(env, poison.id)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)

    result = worker.step(wait=0)
    assert result is not None and result.messages == 1000 and result.isolated == 1
    assert result.report["inserted"] == 999
    assert worker.step(wait=0) is None  # nothing left to retry
    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["dlq"], stats["dlq_poison"]) == (0, 1, 1)
    (dead,) = env.QUEUE.dlq_list()
    assert poison.id in dead["body"]
    assert dead["error"].startswith("DataError: database refused the data") and "out of range" in dead["error"]
    assert_aggregates_equal(env.DB, expected_aggregates(t for i, (_, t) in enumerate(pairs) if i != 617))


def test_redriven_poison_comes_back_alone(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 100, 3)
    refuse_id(env, pairs[40][1].id)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    worker.step(wait=0)
    send_events(env, 50, 4)
    assert env.QUEUE.dlq_redrive() == 1
    result = worker.step(wait=0)
    assert result is not None and result.messages == 51 and result.isolated == 1
    assert result.report["inserted"] == 50
    assert env.QUEUE.stats()["dlq_poison"] == 1


def test_a_transient_fault_dead_letters_nothing(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 100, "max_retries": 1})
    pairs = send_events(env, 1000, 3)
    fault = DiskFull(env)
    heartbeat = Heartbeat(env.DB, "test-worker")
    worker = Worker(env, TrafficConsumer(env.config).handle_batch, heartbeat=heartbeat)
    fault.set(True)
    for _ in range(6):  # more failures than max_retries allows deliveries
        result = worker.step(wait=0)
        assert result is not None and result.transient, result
        assert result.messages == 100 and result.retry_in > 0
        assert worker.degraded and heartbeat.state == "degraded"
    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["dlq"]) == (1000, 0)
    assert _attempts(env) == {0}  # no delivery counted
    (seen,) = worker_status(env.DB)["workers"]
    assert seen["verdict"] == "degraded"
    fault.set(False)
    while (result := worker.step(wait=0)) is not None:
        assert result.ok, result
    assert not worker.degraded and heartbeat.state == "running"
    heartbeat.beat(force=True)
    assert worker_status(env.DB)["workers"][0]["verdict"] == "ok"
    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["dlq"]) == (0, 0)
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))


def test_back_off_doubles_up_to_its_cap(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url, consumer={"backoff_initial_s": 1, "backoff_max_s": 4})
    send_events(env, 1000, 3)  # enough that a batch needs new pages
    fault = DiskFull(env)
    fault.set(True)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    delays = [worker.step(wait=0).retry_in for _ in range(5)]  # type: ignore[union-attr]
    for delay, ceiling in zip(delays, (1, 2, 4, 4, 4), strict=True):
        assert ceiling / 2 <= delay <= ceiling  # jittered below the ceiling


def test_the_loop_waits_out_the_fault_and_resumes(sqlite_url: str, make_env: MakeEnv) -> None:
    """`run()` itself: it backs off (here the wait is replaced by one that clears the fault
    after three waits, so no real time passes) and drains once the fault is gone."""
    env = make_env(sqlite_url, consumer={"max_batch_size": 50})
    pairs = send_events(env, 200, 3)
    fault = DiskFull(env)
    fault.set(True)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 3:
            fault.set(False)
        return False

    worker._wake.wait = wait  # type: ignore[method-assign]
    assert worker.run(until_empty=True) == 4
    assert len(waits) == 3
    assert env.QUEUE.stats()["dlq"] == 0
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))


def test_metrics_show_a_degraded_consumer(sqlite_url: str, make_env: MakeEnv) -> None:
    from pipeline.http.metrics import Metrics

    env = make_env(sqlite_url)
    send_events(env, 1000, 3)
    metrics = Metrics(env)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    worker.on_batch.append(metrics.observe_batch)
    fault = DiskFull(env)
    fault.set(True)
    worker.step(wait=0)
    text = metrics.render().decode()
    assert "edgepipe_consumer_degraded 1.0" in text
    assert 'edgepipe_batches_total{outcome="transient"} 1.0' in text
    fault.set(False)
    worker.step(wait=0)
    assert "edgepipe_consumer_degraded 0.0" in metrics.render().decode()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_killed_postgresql_connection_is_transient(db_url: str, make_env: MakeEnv) -> None:
    """The server ends the consumer's connection in the middle of a batch (as a restart or an
    administrator would): the batch is not counted as a delivery, and the next step, on a new
    connection, commits it."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 300, 3)
    inner = TrafficConsumer(env.config).handle_batch
    calls = itertools.count()

    def handler(batch: Any, env: Env, ctx: Any) -> Any:
        report = inner(batch, env, ctx)
        if next(calls) == 1:
            with env.DB.transaction() as conn:
                conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return report

    worker = Worker(env, handler)
    outcomes = []
    while (result := worker.step(wait=0)) is not None:
        outcomes.append("transient" if result.transient else result.ok)
    assert outcomes == [True, "transient", True, True]
    assert env.QUEUE.stats()["dlq"] == 0
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
