"""The queue contract: the QUEUE binding's Cloudflare Queues semantics on every backend
(`db` on SQLite and PostgreSQL, `sqs` on moto's threaded server, `redis` on the real Redis;
the `queue_backend` fixture): send limits and content types, batches, ack / retry /
dead-letter, leases, the DLQ and concurrent consumers.

A frozen clock (freezegun) drives retry delays on every backend (moto's server runs in this
process; the Redis backend keeps due times by edgepipe's clock). Leases are the server's on
SQS and Redis, so the lease tests use a short real `visibility_timeout` and a receive that
waits, bounded, for the messages to come back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from pipeline.bindings.queue import MAX_MESSAGE_BYTES, REASON_INVALID, REASON_RETRIES, Message, MessageBatch
from pipeline.env import Env
from pipeline.errors import DataError, MessageTooLarge, ValidationError
from pipeline.schema import queue_messages
from pipeline.worker import Worker
from tests.conftest import MakeEnv


@pytest.fixture
def env(qenv: Env) -> Env:
    """This module's `env`: one per queue backend."""
    return qenv


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time("2026-11-20T12:00:00Z") as f:
        yield f


LEASE_S = 2  # a real lease (SQS and Redis keep leases by the server's clock)
LEASE_WAIT_S = 30  # how long a receive may wait for an expired lease's messages (it returns when they come)


def stats(env: Env) -> dict[str, int]:
    s = env.QUEUE.stats()
    return {k: s[k] for k in ("pending", "in_flight", "dlq")}


def receive_all(env: Env, n: int = 100) -> MessageBatch:
    return env.QUEUE.receive(n, 0)


def bodies_of(batch: MessageBatch) -> list[Any]:
    return [m.body for m in batch]


# -- producing ----------------------------------------------------------------------------


def test_send_and_receive_message_fields(env: Env, frozen: FrozenDateTimeFactory) -> None:
    mid = env.QUEUE.send({"hello": "world"})
    batch = receive_all(env)
    assert len(batch) == 1
    (msg,) = batch.messages
    assert msg.id == mid
    assert msg.body == {"hello": "world"}
    assert msg.attempts == 1
    assert isinstance(msg.timestamp, datetime)
    assert msg.timestamp.isoformat() == "2026-11-20T12:00:00+00:00"


def test_send_batch_keeps_order_and_ids(env: Env) -> None:
    ids = env.QUEUE.send_batch([{"n": i} for i in range(25)])
    assert len(ids) == len(set(ids)) == 25
    batch = receive_all(env)
    assert [m.id for m in batch] == ids
    assert bodies_of(batch) == [{"n": i} for i in range(25)]
    assert env.QUEUE.send_batch([]) == []


def test_send_batch_larger_than_one_chunk(env: Env) -> None:
    """More than one chunk of every backend (1000 rows, 10 SQS entries, 1000 Redis entries)."""
    ids = env.QUEUE.send_batch([{"n": i} for i in range(1234)])
    assert len(set(ids)) == 1234
    assert stats(env) == {"pending": 1234, "in_flight": 0, "dlq": 0}


@pytest.mark.parametrize(
    "body",
    [
        {"a": [1, 2, {"b": None}]},
        [1, "two", 3.5],
        42,
        3.25,
        True,
        None,
        "plain text, ünïcödé",
        b"\x00\x01raw bytes\xff",
    ],
)
def test_content_types_round_trip(env: Env, body: Any) -> None:
    env.QUEUE.send(body)
    (msg,) = receive_all(env).messages
    assert msg.body == body
    assert type(msg.body) is type(body)


def test_message_size_limit(env: Env) -> None:
    env.QUEUE.send("x" * MAX_MESSAGE_BYTES)  # exactly at the limit
    with pytest.raises(MessageTooLarge) as err:
        env.QUEUE.send("x" * (MAX_MESSAGE_BYTES + 1))
    assert err.value.field == "body"
    assert str(MAX_MESSAGE_BYTES) in str(err.value)
    with pytest.raises(MessageTooLarge):
        env.QUEUE.send({"path": "/" + "a" * MAX_MESSAGE_BYTES})
    with pytest.raises(MessageTooLarge):
        env.QUEUE.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert stats(env)["pending"] == 1


def test_rejected_batch_enqueues_nothing(env: Env) -> None:
    bodies: list[Any] = [{"n": i} for i in range(10)]
    bodies.insert(5, "y" * (MAX_MESSAGE_BYTES + 10))
    with pytest.raises(MessageTooLarge):
        env.QUEUE.send_batch(bodies)
    with pytest.raises(ValidationError) as err:
        env.QUEUE.send_batch([{"ok": 1}, {"bad": object()}])
    assert err.value.field == "body"
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}


# -- receiving ----------------------------------------------------------------------------


def test_receive_up_to_max(env: Env) -> None:
    env.QUEUE.send_batch([{"n": i} for i in range(10)])
    first = env.QUEUE.receive(4, 0)
    assert bodies_of(first) == [{"n": i} for i in range(4)]
    second = env.QUEUE.receive(100, 0)
    assert bodies_of(second) == [{"n": i} for i in range(4, 10)]
    assert len(env.QUEUE.receive(100, 0)) == 0
    assert stats(env) == {"pending": 0, "in_flight": 10, "dlq": 0}
    with pytest.raises(ValidationError):
        env.QUEUE.receive(0, 0)


def test_full_batch_does_not_wait_and_partial_batch_waits_at_most_the_timeout(env: Env) -> None:
    env.QUEUE.send_batch(list(range(5)))
    started = time.monotonic()
    assert len(env.QUEUE.receive(5, wait_seconds=30)) == 5  # full: returns at once
    assert time.monotonic() - started < 10
    env.QUEUE.send_batch(list(range(3)))
    started = time.monotonic()
    assert len(env.QUEUE.receive(10, wait_seconds=0.3)) == 3  # partial: after the timeout
    assert 0.3 <= time.monotonic() - started < 10


def test_empty_queue_returns_empty_batch(env: Env) -> None:
    batch = env.QUEUE.receive(10, 0)
    assert len(batch) == 0 and batch.messages == []


# -- settling -----------------------------------------------------------------------------


def test_ack_removes(env: Env) -> None:
    env.QUEUE.send_batch([1, 2, 3])
    batch = receive_all(env)
    batch.ack_all()
    env.QUEUE.settle(batch)
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}
    assert len(receive_all(env)) == 0


def test_undecided_messages_are_acked_on_success(env: Env) -> None:
    env.QUEUE.send_batch([1, 2, 3])
    batch = receive_all(env)
    env.QUEUE.settle(batch)
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}


def test_partial_ack_and_retry(env: Env, frozen: FrozenDateTimeFactory) -> None:
    env.QUEUE.send_batch(["a", "b", "c", "d"])
    batch = receive_all(env)
    a, b, c, d = batch.messages
    a.ack()
    b.retry()
    c.retry(delay_seconds=60)
    d.dead_letter(REASON_INVALID, "path: must start with '/'")
    env.QUEUE.settle(batch)
    assert stats(env) == {"pending": 2, "in_flight": 0, "dlq": 1}
    again = receive_all(env)
    assert [(m.body, m.attempts) for m in again] == [("b", 2)]
    env.QUEUE.settle(again)
    frozen.tick(59)
    assert len(receive_all(env)) == 0
    frozen.tick(1)
    later = receive_all(env)
    assert [(m.body, m.attempts) for m in later] == [("c", 2)]
    (dead,) = env.QUEUE.dlq_list()
    assert dead["body"] == "d"  # a text body, stored as sent
    assert dead["reason"] == REASON_INVALID
    assert dead["error"] == "path: must start with '/'"
    assert dead["attempts"] == 1


def test_first_explicit_call_wins() -> None:
    def msg() -> Message:
        return Message("m", datetime.now().timestamp(), 1, b"{}")

    m = msg()
    m.ack()
    m.retry(5)
    m.dead_letter("invalid")
    assert m.decision == "ack"
    m = msg()
    m.retry(5)
    m.ack()
    assert (m.decision, m.delay) == ("retry", 5)
    m = msg()
    m.dead_letter("invalid", "x")
    m.ack()
    m.retry()
    assert m.decision == "dead"
    first, second = msg(), msg()
    second.retry()
    batch = MessageBatch("q", [first, second])
    batch.ack_all()
    assert (first.decision, second.decision) == ("ack", "retry")
    third = msg()
    batch = MessageBatch("q", [third])
    batch.retry_all(7)
    batch.ack_all()
    assert (third.decision, third.delay) == ("retry", 7)


def test_first_call_wins_when_settled(env: Env) -> None:
    env.QUEUE.send_batch(["keep", "drop"])
    batch = receive_all(env)
    keep, drop = batch.messages
    keep.retry()
    drop.ack()
    batch.retry_all()  # too late for both
    env.QUEUE.settle(batch)
    assert bodies_of(receive_all(env)) == ["keep"]


def test_failure_retries_everything_but_dead_letters(env: Env) -> None:
    env.QUEUE.send_batch(["acked", "plain", "poison", "retried"])
    batch = receive_all(env)
    acked, _plain, poison, retried = batch.messages
    acked.ack()
    poison.dead_letter(REASON_INVALID, "status: must be between 100 and 599, got 999")
    retried.retry(delay_seconds=0)
    env.QUEUE.settle(batch, failure="RuntimeError: disk on fire")
    assert stats(env) == {"pending": 3, "in_flight": 0, "dlq": 1}
    again = receive_all(env)
    assert sorted(bodies_of(again)) == ["acked", "plain", "retried"]
    assert all(m.attempts == 2 for m in again)


def test_the_db_queue_keeps_the_last_error(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url)
    env.QUEUE.send_batch(["a", "b"])
    env.QUEUE.settle(receive_all(env), failure="RuntimeError: disk on fire")
    with env.DB.read() as conn:
        errors = set(conn.execute(sa.select(queue_messages.c.last_error)).scalars())
    assert errors == {"RuntimeError: disk on fire"}


def test_handler_exception_through_worker(env: Env) -> None:
    """A handler error isolates the message that causes it: the rest of the batch commits
    (the invalid one to the DLQ), the culprit alone is retried, its delivery counted."""
    env.QUEUE.send_batch([{"n": i} for i in range(5)])

    def handler(batch: MessageBatch, env: Env, ctx: Any) -> None:
        for m in batch:
            if m.body["n"] == 1:
                m.dead_letter(REASON_INVALID, "n: poison")
        if any(m.body["n"] == 3 for m in batch):
            raise ValueError("handler broke")

    result = Worker(env, handler).step(wait=0)
    assert result is not None and not result.ok
    assert result.error == "ValueError: handler broke"
    assert result.isolated == 1
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 1}
    assert env.QUEUE.dlq_list()[0]["error"] == "n: poison"
    (left,) = receive_all(env).messages
    assert (left.body, left.attempts) == ({"n": 3}, 2)


def test_decisions_of_a_batch_handled_by_the_worker(env: Env, frozen: FrozenDateTimeFactory) -> None:
    """Per-message decisions taken by a handler the worker runs (inside the DB transaction
    on the `db` queue): acks are gone, a retry comes back after its delay with its id and
    body, a dead letter keeps its body and reason, and a message that is part dead
    keeps its other elements."""
    ids = env.QUEUE.send_batch([{"n": 0}, {"n": 1}, {"n": 2}, [{"n": 3}, {"n": 4}], {"n": 5}])

    def handler(batch: MessageBatch, env: Env, ctx: Any) -> None:
        for m in batch:
            body = m.body
            if body == {"n": 1}:
                m.retry(60)
            elif body == {"n": 2}:
                m.dead_letter(REASON_INVALID, "n: two")
            elif isinstance(body, list):
                m.dead_letter_part(1, REASON_INVALID, "n: four")

    result = Worker(env, handler).step(wait=0)
    assert result is not None and result.ok and result.messages == 5
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 2}
    assert receive_all(env).messages == []  # the retry waits for its delay
    frozen.tick(61)
    (again,) = receive_all(env).messages
    assert (again.id, again.body, again.attempts) == (ids[1], {"n": 1}, 2)
    assert sorted((d["message_id"], d["body"], d["error"]) for d in env.QUEUE.dlq_list()) == [
        (ids[2], '{"n":2}', "n: two"),
        (f"{ids[3]}:1", '{"n":4}', "n: four"),
    ]


def test_a_value_the_database_refuses_is_dead_lettered_alone_as_poison(env: Env) -> None:
    env.QUEUE.send_batch([{"n": i} for i in range(8)])

    def handler(batch: MessageBatch, env: Env, ctx: Any) -> None:
        if any(m.body["n"] == 5 for m in batch):
            raise DataError("database refused the data: integer out of range")

    result = Worker(env, handler).step(wait=0)
    assert result is not None and result.isolated == 1
    assert env.QUEUE.stats() == {"pending": 0, "in_flight": 0, "dlq": 1, "dlq_poison": 1}
    (dead,) = env.QUEUE.dlq_list()
    assert dead["body"] == '{"n":5}'
    assert dead["reason"] == "poison" and dead["error"] == "DataError: database refused the data: integer out of range"


def test_handler_writes_roll_back_with_the_batch(env: Env) -> None:
    """The handler's DB writes and the ack share one transaction: a failure undoes both."""
    from pipeline import meta

    env.QUEUE.send("x")

    def handler(batch: MessageBatch, env: Env, ctx: Any) -> None:
        with env.DB.transaction() as conn:
            meta.put(env.DB, conn, "probe", "written")
        raise RuntimeError("after the write")

    assert Worker(env, handler).step(wait=0).ok is False  # type: ignore[union-attr]
    with env.DB.read() as conn:
        assert meta.get(conn, "probe") is None
    assert stats(env)["pending"] == 1


def test_retry_delay_from_config(make_qenv: MakeEnv, frozen: FrozenDateTimeFactory) -> None:
    env = make_qenv(consumer={"retry_delay": 30})
    env.QUEUE.send("x")
    env.QUEUE.settle(receive_all(env), failure="boom")
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 0}
    frozen.tick(29.9)
    assert len(receive_all(env)) == 0
    frozen.tick(0.2)
    assert [m.attempts for m in receive_all(env)] == [2]


def test_explicit_delay_overrides_config(make_qenv: MakeEnv, frozen: FrozenDateTimeFactory) -> None:
    env = make_qenv(consumer={"retry_delay": 30})
    env.QUEUE.send("x")
    batch = receive_all(env)
    batch.retry_all(delay_seconds=0)
    env.QUEUE.settle(batch)
    assert len(receive_all(env)) == 1


def test_visibility_timeout_redelivers(make_qenv: MakeEnv) -> None:
    env = make_qenv(consumer={"visibility_timeout": LEASE_S})
    env.QUEUE.send_batch(["a", "b"])
    lost = receive_all(env)  # a consumer that dies holding the batch
    assert stats(env) == {"pending": 0, "in_flight": 2, "dlq": 0}
    assert len(receive_all(env)) == 0  # leased: invisible until the lease ends
    again = env.QUEUE.receive(2, wait_seconds=LEASE_WAIT_S)
    assert sorted(bodies_of(again)) == ["a", "b"]
    assert [m.attempts for m in again] == [2, 2]
    assert {m.id for m in again} == {m.id for m in lost}  # the ids stay
    # the dead consumer's late settle must not touch messages leased to someone else
    lost.ack_all()
    env.QUEUE.settle(lost)
    assert stats(env) == {"pending": 0, "in_flight": 2, "dlq": 0}
    env.QUEUE.settle(again)
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}


def test_max_retries_then_dlq(make_qenv: MakeEnv) -> None:
    env = make_qenv(consumer={"max_retries": 2})
    env.QUEUE.send({"n": 1})
    for attempt in (1, 2):
        batch = receive_all(env)
        assert [m.attempts for m in batch] == [attempt]
        env.QUEUE.settle(batch, failure=f"TransientError: attempt {attempt}")
        assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 0}
    batch = receive_all(env)
    assert [m.attempts for m in batch] == [3]
    env.QUEUE.settle(batch, failure="TransientError: attempt 3")
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 1}
    assert env.QUEUE.stats()[f"dlq_{REASON_RETRIES}"] == 1
    (dead,) = env.QUEUE.dlq_list()
    assert dead["reason"] == REASON_RETRIES
    assert dead["attempts"] == 3
    assert "TransientError: attempt 3" in dead["error"]
    assert dead["body"] == '{"n":1}'


def test_failing_handler_exhausts_retries_through_the_worker(make_qenv: MakeEnv) -> None:
    """A handler that always raises: the worker retries the batch, and after 1 + max_retries
    deliveries the messages reach the DLQ with the handler's last error."""
    env = make_qenv(consumer={"max_retries": 2})
    env.QUEUE.send_batch(["x", "y"])
    calls: list[list[int]] = []

    def handler(batch: MessageBatch, env: Env, ctx: Any) -> None:
        calls.append([m.attempts for m in batch])
        raise RuntimeError(f"broken handler, call {len(calls)}")

    worker = Worker(env, handler)
    while worker.step(wait=0) is not None:
        assert len(calls) <= 9, calls
    # each delivery: the batch, then each half alone (which finds no single culprit)
    assert calls == [[1, 1], [1], [1], [2, 2], [2], [2], [3, 3], [3], [3]]
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 2}
    dead = env.QUEUE.dlq_list()
    assert {d["reason"] for d in dead} == {REASON_RETRIES}
    assert {d["error"].rsplit(", call ", 1)[1] for d in dead} == {"8", "9"}


def test_explicit_retries_also_exhaust(make_qenv: MakeEnv) -> None:
    env = make_qenv(consumer={"max_retries": 0})
    env.QUEUE.send("x")
    batch = receive_all(env)
    batch.retry_all()
    env.QUEUE.settle(batch)
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 1}
    assert env.QUEUE.dlq_list()[0]["reason"] == REASON_RETRIES


def test_expired_leases_count_as_deliveries(make_qenv: MakeEnv) -> None:
    env = make_qenv(consumer={"max_retries": 1, "visibility_timeout": LEASE_S})
    env.QUEUE.send("x")
    receive_all(env)  # dies
    batch = env.QUEUE.receive(1, wait_seconds=LEASE_WAIT_S)
    assert [m.attempts for m in batch] == [2]
    env.QUEUE.settle(batch, failure="boom")
    assert stats(env)["dlq"] == 1


# -- stats, DLQ operations ----------------------------------------------------------------


def test_stats_counts(env: Env, frozen: FrozenDateTimeFactory) -> None:
    env.QUEUE.send_batch(list(range(10)))
    batch = env.QUEUE.receive(4, 0)
    assert stats(env) == {"pending": 6, "in_flight": 4, "dlq": 0}
    batch.messages[0].dead_letter(REASON_INVALID, "a")
    batch.messages[1].dead_letter("too_late", "b")
    batch.messages[2].retry(delay_seconds=100)
    env.QUEUE.settle(batch)
    s = env.QUEUE.stats()
    # A message retried with a delay is waiting (SQS counts it as not visible: in flight)
    assert (s["pending"] + s["in_flight"], s["dlq"]) == (7, 2)
    assert s["pending"] >= 6
    assert s["dlq_invalid"] == 1 and s["dlq_too_late"] == 1
    assert env.QUEUE.depth() == 7


def test_dlq_list_and_redrive(env: Env) -> None:
    env.QUEUE.send_batch([{"n": i} for i in range(5)])
    batch = receive_all(env)
    for m in batch.messages[:3]:
        m.dead_letter(REASON_INVALID, f"n: bad {m.body['n']}")
    env.QUEUE.settle(batch)
    listed = env.QUEUE.dlq_list()
    assert [d["error"] for d in listed] == ["n: bad 0", "n: bad 1", "n: bad 2"]
    assert set(listed[0]) >= {"message_id", "attempts", "reason", "error", "failed_at", "body"}
    assert listed[0]["failed_at"].endswith("Z")
    assert [d["message_id"] for d in listed] == [m.id for m in batch.messages[:3]]
    assert len(env.QUEUE.dlq_list(limit=2)) == 2

    assert env.QUEUE.dlq_redrive(limit=1) == 1
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 2}
    assert env.QUEUE.dlq_redrive() == 2
    assert env.QUEUE.dlq_redrive() == 0
    again = receive_all(env)
    assert sorted(m.body["n"] for m in again) == [0, 1, 2]
    assert all(m.attempts == 1 for m in again)  # a fresh attempt count
    assert {m.id for m in again} == {m.id for m in batch.messages[:3]}  # ids are kept
    assert env.QUEUE.dlq_list() == []


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_receivers_never_share_a_message(make_qenv: MakeEnv) -> None:
    """Two consumers (two Envs on the same database, each with its own engine) drain the
    queue at once; every message is received exactly once."""
    a, b = make_qenv(), make_qenv()
    ids = a.QUEUE.send_batch([{"n": i} for i in range(600)])
    got: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def drain(name: str, env: Env) -> None:
        try:
            start.wait()
            while True:
                batch = env.QUEUE.receive(7, 0)
                if not batch.messages:
                    return
                got[name] += [m.id for m in batch]
                env.QUEUE.settle(batch)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(n, e)) for n, e in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(ids)
    assert stats(a) == {"pending": 0, "in_flight": 0, "dlq": 0}


def test_leased_messages_are_invisible_to_another_consumer(make_qenv: MakeEnv) -> None:
    a, b = make_qenv(), make_qenv()
    a.QUEUE.send_batch(list(range(6)))
    first = a.QUEUE.receive(4, 0)
    second = b.QUEUE.receive(10, 0)
    assert bodies_of(first) == [0, 1, 2, 3]
    assert bodies_of(second) == [4, 5]


# -- exactly-once across redeliveries -----------------------------------------------------


def test_an_event_without_an_id_is_stored_once_across_a_redelivery(make_qenv: MakeEnv) -> None:
    """The batch commits, then the consumer dies before the ack: the queue redelivers, the
    event (which has no id of its own, so it takes the message id) keeps its (ts, id) key
    and is dropped as the duplicate it is."""
    from consumers.traffic import TrafficConsumer
    from pipeline import clock
    from pipeline.schema import path_stats_hourly, traffic_events

    env = make_qenv(consumer={"visibility_timeout": LEASE_S})
    consumer = TrafficConsumer(env.config)
    ts = int(clock.now_s() * 1000)
    env.QUEUE.send({"ts": ts, "method": "GET", "path": "/once", "status": 200, "response_time_ms": 3})
    first = receive_all(env)
    assert consumer.handle_batch(first, env).inserted == 1  # committed; the ack never happens
    again = env.QUEUE.receive(1, wait_seconds=LEASE_WAIT_S)
    assert [m.id for m in again] == [m.id for m in first]
    report = consumer.handle_batch(again, env)
    assert (report.inserted, report.duplicates) == (0, 1)
    env.QUEUE.settle(again)
    with env.DB.read() as conn:
        ids = conn.execute(sa.select(traffic_events.c.id)).scalars().all()
        requests = conn.execute(sa.select(sa.func.sum(path_stats_hourly.c.requests))).scalar()
    assert ids == [first.messages[0].id] and requests == 1
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}
