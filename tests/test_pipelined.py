"""A pipelined worker (`edgepipe worker`) leaves a batch's commit in flight on PostgreSQL
while it takes the next one: a batch is reported once its commit is confirmed, and a commit
that fails is handled as a failure inside the transaction would be (poison isolated, a
transient fault backed off from), losing nothing and counting nothing twice. On SQLite the
same worker commits each batch before it returns."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from consumers import traffic
from consumers.traffic import TrafficConsumer
from pipeline import meta
from pipeline.bindings import queue_sql
from pipeline.env import Env
from pipeline.errors import TransientError
from pipeline.schema import OTHER_PATH, queue_messages
from pipeline.worker import StepResult, Worker
from tests.conftest import MakeEnv
from tests.faults import NOW, NOW_MS, refuse_path, send_events
from tests.traffic_truth import assert_aggregates_equal, expected_aggregates


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as f:
        yield f


def _pipelined(env: Env, handler: Any = None) -> tuple[Worker, list[StepResult]]:
    worker = Worker(env, handler or TrafficConsumer(env.config).handle_batch, pipelined=True)
    reported: list[StepResult] = []
    worker.on_batch.append(reported.append)
    return worker, reported


def _take(env: Env) -> list[int]:
    """A batch of up to 10 taken and acked in a transaction: the `n` of their bodies."""
    with env.DB.transaction():
        batch = env.QUEUE.receive(10)
        env.QUEUE.settle(batch)
    return [m.body["n"] for m in batch]


def _quality(env: Env) -> dict[str, int]:
    with env.DB.read() as conn:
        rows = conn.execute(sa.text("SELECT kind, sum(count) FROM quality_hourly GROUP BY kind")).all()
    return {kind: int(n) for kind, n in rows}


def test_batches_are_reported_once_their_commit_is_confirmed(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 250})
    pairs = send_events(env, 2000, 5)
    worker, reported = _pipelined(env)
    first = worker.step(wait=0)
    assert first is not None and first.ok and first.messages == 250
    # PostgreSQL: the first batch's commit is in flight until the next step confirms it.
    assert len(reported) == (0 if env.DB.dialect == "postgresql" else 1)
    while worker.step(wait=0) is not None:
        pass
    assert [r.messages for r in reported] == [250] * 8  # each batch reported once, in order
    assert all(r.ok for r in reported) and sum(r.report.inserted for r in reported) == 2000
    assert worker.batches == 8
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
    assert _quality(env)["inserted"] == 2000
    assert env.QUEUE.stats()["pending"] == 0


def test_a_poison_met_at_the_commit_is_isolated(db_url: str, make_env: MakeEnv) -> None:
    """The hourly rows are written at the commit: a value refused there fails the commit in
    flight, and the worker splits that batch to find the one event, as it would after a
    failure inside the transaction."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 600, 5)
    poison = pairs[345][1]
    refuse_path(env, poison.path)
    keep = [t for _, t in pairs if t.path != poison.path]
    bad = len(pairs) - len(keep)
    worker, reported = _pipelined(env)
    while worker.step(wait=0) is not None:
        pass
    assert sum(r.messages for r in reported) == 600
    failed = [r for r in reported if not r.ok]
    assert failed and sum(r.isolated for r in failed) == bad  # every event of that path, alone
    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["dlq_poison"]) == (0, bad)
    assert "value out of range" in env.QUEUE.dlq_list()[0]["error"]
    assert_aggregates_equal(env.DB, expected_aggregates(keep))
    assert _quality(env)["inserted"] == len(keep)


# The conftest's `db_url`, on PostgreSQL only: these tests are about its background commits.
POSTGRES_ONLY = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@POSTGRES_ONLY
def test_a_connection_lost_at_the_commit_is_transient(db_url: str, make_env: MakeEnv) -> None:
    """The server ends the connection of the commit in flight (a restart, an administrator):
    the batch rolls back with its messages, the worker backs off once, and the messages are
    taken again: nothing lost, nothing twice, no delivery counted."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 500, 5)
    inner = TrafficConsumer(env.config).handle_batch
    calls = itertools.count()

    def handler(batch: Any, env: Env, ctx: Any) -> Any:
        report = inner(batch, env, ctx)
        if next(calls) == 1:
            env.DB.at_commit(lambda conn: conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())"))
        return report

    worker, reported = _pipelined(env, handler)
    outcomes = []
    while (result := worker.step(wait=0)) is not None:
        outcomes.append(result.transient)
    assert outcomes.count(True) == 1
    transient = [r for r in reported if r.transient]
    assert len(transient) == 1 and "database unavailable" in (transient[0].error or "")
    assert sum(r.messages for r in reported if r.ok) == 500
    assert env.QUEUE.stats()["dlq"] == 0
    with env.DB.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(queue_messages)).scalar_one() == 0
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
    assert _quality(env)["inserted"] == 500


def test_at_commit_work_joins_its_transaction(db_url: str, make_env: MakeEnv) -> None:
    """Work left to the commit runs inside the transaction, in order, and rolls back with
    it; with `background` on PostgreSQL the block returns before the commit, whose Future
    the caller waits for."""
    env = make_env(db_url)
    db = env.DB
    with db.transaction() as conn:
        conn.exec_driver_sql("CREATE TABLE t_at_commit (n INTEGER)")
    order: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), db.transaction():
        db.at_commit(lambda c: c.exec_driver_sql("INSERT INTO t_at_commit VALUES (1)"))
        db.at_commit(lambda c: (_ for _ in ()).throw(RuntimeError("boom")))
    with db.transaction(background=True) as conn:
        conn.exec_driver_sql("INSERT INTO t_at_commit VALUES (2)")
        db.at_commit(lambda c: order.append(1))
        db.at_commit(lambda c: (order.append(2), c.exec_driver_sql("INSERT INTO t_at_commit VALUES (3)")))
        assert db.commits_in_background() == (db.dialect == "postgresql")
    assert db.committing is not None
    db.committing.result()
    assert order == [1, 2]
    with db.read() as conn:
        assert sorted(conn.exec_driver_sql("SELECT n FROM t_at_commit").scalars()) == [2, 3]
    with pytest.raises(RuntimeError, match="no transaction"):
        db.at_commit(lambda c: None)


@POSTGRES_ONLY
def test_a_kept_write_connection_that_died_idle_is_replaced(db_url: str, make_env: MakeEnv) -> None:
    """Write transactions reuse the binding's idle connection without the pool's ping; one
    the server ended meanwhile fails its transaction as a transient fault, and the next
    transaction runs on a fresh connection."""
    db = make_env(db_url).DB
    pid = "SELECT pg_backend_pid()"
    with db.transaction() as conn:
        first = conn.exec_driver_sql(pid).scalar_one()
    with db.transaction() as conn:
        assert conn.exec_driver_sql(pid).scalar_one() == first  # kept
    with db.engine.connect() as other:
        other.exec_driver_sql(f"SELECT pg_terminate_backend({first})")
    with pytest.raises(TransientError), db.transaction() as conn:
        conn.exec_driver_sql("SELECT 1")
    with db.transaction() as conn:
        assert conn.exec_driver_sql(pid).scalar_one() != first


@POSTGRES_ONLY
def test_a_take_starts_at_its_floor_and_from_the_start_at_least_every_floor_takes(
    db_url: str, make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQL queue on PostgreSQL starts a take after the last full one (the index
    entries of consumed rows before it are not walked again); a message below that floor
    (here a batch another worker took and rolled back) is taken again within
    `FLOOR_TAKES` takes."""
    monkeypatch.setattr(queue_sql, "FLOOR_TAKES", 2)
    mine, other = make_env(db_url), make_env(db_url)  # two workers: two bindings
    mine.QUEUE.send_batch([{"n": i} for i in range(60)])

    with pytest.raises(RuntimeError), other.DB.transaction():
        assert [m.body["n"] for m in other.QUEUE.receive(10)] == list(range(10))
        assert _take(mine) == list(range(10, 20))  # the first ten are locked: skipped
        raise RuntimeError("the other worker's batch rolls back: its messages are back, below the floor")
    assert _take(mine) == list(range(20, 30))  # from the floor
    assert _take(mine) == list(range(30, 40))
    assert _take(mine) == list(range(10))  # from the start, after FLOOR_TAKES takes from a floor
    assert _take(mine) == list(range(40, 50))
    other.QUEUE.send_batch([{"n": 60}])
    assert _take(mine) == list(range(50, 60))
    assert _take(mine) == [60]


@POSTGRES_ONLY
def test_a_short_take_from_a_floor_takes_the_rest_from_the_start(db_url: str, make_env: MakeEnv) -> None:
    """A queue is never seen empty, nor a batch short, while a message below the floor is
    ready: a take from the floor that comes back short goes on from the start."""
    mine, other = make_env(db_url), make_env(db_url)
    mine.QUEUE.send_batch([{"n": i} for i in range(25)])

    with pytest.raises(RuntimeError), other.DB.transaction():
        other.QUEUE.receive(10)
        assert _take(mine) == list(range(10, 20))
        raise RuntimeError("rolled back")
    assert _take(mine) == [0, 1, 2, 3, 4, 20, 21, 22, 23, 24]
    assert _take(mine) == [5, 6, 7, 8, 9]
    assert _take(mine) == []


@POSTGRES_ONLY
def test_a_transaction_that_takes_messages_commits_without_waiting_for_the_disk(db_url: str, make_env: MakeEnv) -> None:
    """Taking a batch inside a transaction makes it redoable (a lost commit gives the batch
    back): its commit does not wait for the WAL flush; other transactions still do."""
    env = make_env(db_url)
    env.QUEUE.send_batch([{"n": 1}])
    show = "SHOW synchronous_commit"
    with env.DB.transaction() as conn:
        assert conn.exec_driver_sql(show).scalar_one() == "on"
        assert len(env.QUEUE.receive(10)) == 1
        assert conn.exec_driver_sql(show).scalar_one() == "off"
    with env.DB.transaction() as conn:
        assert conn.exec_driver_sql(show).scalar_one() == "on"


@POSTGRES_ONLY
def test_a_watermark_moved_before_the_commit_is_checked_there(db_url: str, make_env: MakeEnv) -> None:
    """The pipelined consumer checks a batch against the archive watermark read at its own
    commit: a watermark the archiver moved after the batch was handled makes the commit
    fail, and the batch is handled again, its events now too late dead-lettered as such;
    nothing is counted twice."""
    env = make_env(db_url, consumer={"max_batch_size": 50})
    pairs = send_events(env, 100, 5)
    watermark = NOW_MS - 86_400_000
    worker, reported = _pipelined(env)
    assert worker.step(wait=0) is not None
    worker.flush()  # the first batch committed; its commit read the watermark for the next
    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(watermark))
    assert worker.step(wait=0) is not None  # handled with the watermark read before it moved
    worker.flush()
    late = [t for _, t in pairs[50:] if t.ts < watermark]
    assert late  # the check has something to find
    assert sum(r.messages for r in reported) == 100 and all(r.ok for r in reported)
    assert env.QUEUE.rejected_totals()["too_late"] == len(late)
    assert _quality(env)["too_late"] == len(late)
    assert _quality(env)["inserted"] == 100 - len(late)
    assert_aggregates_equal(env.DB, expected_aggregates(t for t in (t for _, t in pairs) if t not in late))


def test_after_a_full_batch_the_next_is_taken_without_waiting(db_url: str, make_env: MakeEnv) -> None:
    """The worker waits for a full batch (up to `max_batch_timeout`) only after a batch that
    was not full: behind a backlog it takes the next batch at once, without the wait's count
    of ready messages."""
    env = make_env(db_url, consumer={"max_batch_size": 100, "max_batch_timeout": 0.01})
    send_events(env, 250, 5)
    waits: list[float] = []
    # Recorded, not done: time is frozen here. (A take inside the transaction waits 0 s.)
    env.QUEUE.wait = lambda n, seconds: waits.append(seconds) if seconds else None  # type: ignore[method-assign]
    worker, reported = _pipelined(env)
    sizes = []
    while (result := worker.step()) is not None:
        sizes.append(result.messages)
    assert sizes == [100, 100, 50]
    assert waits == [0.01, 0.01]  # before the first batch, and after the short one (which found nothing)
    assert [r.messages for r in reported] == [100, 100, 50]


@POSTGRES_ONLY
def test_the_path_budget_counts_the_paths_of_the_commit_in_flight(
    db_url: str, make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An hour's paths are known locally for the hours of the batch whose commit is in
    flight (all of them, however many), and read again only after that commit: a path past
    the budget in the next batch overflows even while the commit that spent the budget has
    not landed. The first batch's commit is held until someone waits for it, or the second
    batch has been handled."""
    monkeypatch.setattr(traffic, "KNOWN_PATHS_HOURS", 1)  # fewer than the first batch's hours
    env = make_env(db_url, consumer={"max_batch_size": 6}, paths={"max_paths_per_hour": 2})
    hours = [NOW_MS // 3_600_000 * 3_600_000 - h * 3_600_000 for h in (3, 2, 1)]
    first = [(h, p) for h in hours for p in ("/a", "/b")]  # the budget of each hour, spent
    bodies = [
        {"id": f"e{i}", "ts": ts + 1000, "method": "GET", "path": path, "status": 200, "response_time_ms": 1.0}
        for i, (ts, path) in enumerate([*first, (hours[0], "/c")])
    ]
    env.QUEUE.send_batch(bodies)
    held, calls, inner = threading.Event(), itertools.count(), TrafficConsumer(env.config).handle_batch

    def handler(batch: Any, env: Env, ctx: Any) -> Any:
        call = next(calls)
        if call == 0:
            env.DB.at_commit(lambda conn: held.wait(timeout=60))
        report = inner(batch, env, ctx)
        if call > 0:
            held.set()
        return report

    await_commit = env.DB.await_commit

    def release_then_await() -> None:
        held.set()
        await_commit()

    monkeypatch.setattr(env.DB, "await_commit", release_then_await)
    worker, reported = _pipelined(env, handler)
    while worker.step(wait=0) is not None:
        pass
    worker.flush()
    assert [r.messages for r in reported] == [6, 1] and all(r.ok for r in reported)
    with env.DB.read() as conn:
        rows = conn.execute(sa.text("SELECT hour, path, requests FROM path_stats_hourly")).all()
    assert sorted((hour * 1000, path, n) for hour, path, n in rows) == sorted(
        [(h, p, 1) for h, p in first] + [(hours[0], OTHER_PATH, 1)]
    )
    assert _quality(env)["overflow"] == 1


def _untaken(env: Env) -> list[int]:
    """The `seq` of the messages another consumer could take now (locked by no transaction)."""
    with env.DB.read() as conn:
        return list(
            conn.execute(
                sa.select(queue_messages.c.seq).order_by(queue_messages.c.seq).with_for_update(skip_locked=True)
            ).scalars()
        )


def _drained(worker: Worker) -> None:
    while worker.step(wait=0) is not None:
        pass
    worker.drain()


@POSTGRES_ONLY
def test_behind_batches_of_duplicates_the_next_is_taken_ahead_and_given_back_at_drain(
    db_url: str, make_env: MakeEnv
) -> None:
    """Once a full batch was all duplicates (a backlog delivered again), the consumer has
    the queue send the take of the next batch as soon as it has taken one, in a
    transaction of its own, and handle the batch in hand while the server takes: other
    consumers skip both. Not behind new events. `drain()` rolls the batch taken ahead back
    into the queue, and nothing is lost or counted twice."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 400, 5)
    seqs = _untaken(env)
    worker, reported = _pipelined(env)
    for _ in range(2):
        assert worker.step(wait=0) is not None
    assert _untaken(env) == seqs[200:]  # new events: nothing taken ahead
    _drained(worker)
    env.QUEUE.send_batch([body for body, _ in pairs])  # delivered again
    seqs = _untaken(env)
    assert worker.step(wait=0) is not None  # all duplicates
    assert _untaken(env) == seqs[100:]
    assert worker.step(wait=0) is not None
    assert _untaken(env) == seqs[300:]  # the batch committing, and the next, taken ahead
    worker.drain()
    assert _untaken(env) == seqs[200:]
    _drained(worker)
    assert [r.messages for r in reported] == [100] * 8 and all(r.ok for r in reported)
    assert [r.report.duplicates for r in reported[4:]] == [100] * 4
    assert _untaken(env) == []
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
    assert _quality(env)["inserted"] == 400


@POSTGRES_ONLY
def test_a_batch_taken_ahead_that_came_back_short_is_topped_up(db_url: str, make_env: MakeEnv) -> None:
    """A take sent ahead sees the queue as it was then: when its batch is used, messages
    sent since top it up, so a step finds nothing only when the queue is empty."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 250, 5)
    worker, reported = _pipelined(env)
    _drained(worker)
    env.QUEUE.send_batch([body for body, _ in pairs])  # delivered again: the second batch takes the last 50 ahead
    sizes = [worker.step(wait=0).messages for _ in range(2)]  # type: ignore[union-attr]
    more = send_events(env, 100, 6)
    while (result := worker.step(wait=0)) is not None:
        sizes.append(result.messages)
    worker.drain()
    assert sizes == [100, 100, 100, 50]
    assert sum(r.messages for r in reported) == 600 and all(r.ok for r in reported)
    assert sum(r.report.inserted for r in reported) == 350
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs + more))


@POSTGRES_ONLY
def test_a_connection_lost_while_its_batch_waits_ahead_is_transient(db_url: str, make_env: MakeEnv) -> None:
    """The server ends the connection of the batch taken ahead: the step that uses it
    backs off once, the batch went back to the queue with the rollback, and the worker
    takes it again: nothing lost, nothing twice, no delivery counted."""
    env = make_env(db_url, consumer={"max_batch_size": 100})
    pairs = send_events(env, 300, 5)
    worker, reported = _pipelined(env)
    _drained(worker)
    env.QUEUE.send_batch([body for body, _ in pairs])  # delivered again
    for _ in range(2):  # the second takes the third ahead
        assert worker.step(wait=0) is not None
    worker.flush()  # the batches committed: the only transaction left open is the one taken ahead
    with env.DB.engine.connect() as other:
        ended = other.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state <> 'idle' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).scalars()
        assert list(ended) == [True]
    outcomes = []
    while (result := worker.step(wait=0)) is not None:
        outcomes.append(result.transient)
    worker.drain()
    assert outcomes.count(True) == 1
    assert sum(r.messages for r in reported if r.ok) == 600
    assert env.QUEUE.stats()["pending"] == 0 and env.QUEUE.stats()["dlq"] == 0
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
    assert _quality(env)["inserted"] == 300
    assert _quality(env)["duplicate"] == 300
