"""What the queue contract (tests/test_queue.py) cannot see of the Redis Streams backend:
leases kept by the server's clock (XAUTOCLAIM), ownership of a delivery, `release`, the age
of a queue with delayed retries, consumers in threads, the DLQ under concurrent callers,
and a stream left clean. Leases are real and short; a receive that waits (bounded) for
them stands in for sleeping."""

from __future__ import annotations

import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from freezegun import freeze_time

from pipeline.bindings.queue import REASON_INVALID, QueueSettings
from pipeline.bindings.queue_redis import GROUP, RedisQueue
from pipeline.errors import ConfigError, TransientError

SHORT_LEASE_S = 0.2
WAIT_S = 30  # a bound: a waiting receive returns as soon as its messages come back
MakeQueue = Callable[..., RedisQueue]


@pytest.fixture
def stream(redis_server_url: str) -> Iterator[str]:
    name = f"edgepipe-test-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(redis_server_url)
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def raw(redis_server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


@pytest.fixture
def make_queue(redis_server_url: str, stream: str) -> Iterator[MakeQueue]:
    """`make_queue(**settings)`: one more consumer of the test's stream, its group ensured."""
    made: list[RedisQueue] = []

    def make(ensure: bool = True, **settings: Any) -> RedisQueue:
        queue = RedisQueue.from_url(f"{redis_server_url}?stream={stream}", QueueSettings(**settings))
        if ensure:
            queue.ensure()
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def owners(raw: redis.Redis, stream: str) -> dict[str, tuple[str, int]]:
    """The PEL: entry id → (consumer, delivery count)."""
    rows = raw.xpending_range(stream, GROUP, "-", "+", 1000)
    return {r["message_id"].decode(): (r["consumer"].decode(), r["times_delivered"]) for r in rows}


# -- leases -------------------------------------------------------------------------------


def test_an_expired_lease_is_taken_by_another_consumer(make_queue: MakeQueue, raw: redis.Redis, stream: str) -> None:
    a, b = make_queue(visibility_timeout=SHORT_LEASE_S), make_queue(visibility_timeout=SHORT_LEASE_S)
    ids = a.send_batch(["x", "y"])
    lost = a.receive(10, 0)  # a consumer that dies holding the batch
    assert [m.attempts for m in lost] == [1, 1]
    again = b.receive(2, wait_seconds=WAIT_S)
    assert [m.id for m in again] == ids and [m.body for m in again] == ["x", "y"]
    assert [m.attempts for m in again] == [2, 2]
    assert {owner for owner, _ in owners(raw, stream).values()} == {b.consumer}
    b.settle(again)
    assert b.stats() == {"pending": 0, "in_flight": 0, "dlq": 0}


def test_a_lease_hides_messages_from_other_consumers(make_queue: MakeQueue) -> None:
    a, b = make_queue(), make_queue()
    a.send_batch(list(range(6)))
    assert [m.body for m in a.receive(4, 0)] == [0, 1, 2, 3]
    assert [m.body for m in b.receive(10, 0)] == [4, 5]
    assert len(b.receive(10, 0)) == 0
    assert a.stats() == {"pending": 0, "in_flight": 6, "dlq": 0}


def test_a_late_settle_leaves_a_delivery_claimed_by_another_consumer_alone(
    make_queue: MakeQueue, raw: redis.Redis, stream: str
) -> None:
    a, b = make_queue(visibility_timeout=SHORT_LEASE_S), make_queue(visibility_timeout=SHORT_LEASE_S)
    a.send_batch(["x", "y", "z"])
    lost = a.receive(10, 0)
    again = b.receive(3, wait_seconds=WAIT_S)
    assert len(again) == 3
    held = owners(raw, stream)
    lost.messages[0].ack()
    lost.messages[1].dead_letter(REASON_INVALID, "late")
    lost.messages[2].retry(delay_seconds=60)
    a.settle(lost)
    a.settle(lost, failure="RuntimeError: late")
    a.release(lost)
    assert owners(raw, stream) == held  # still b's, delivery counts unchanged
    assert raw.xlen(stream) == 3 and a.dlq_list() == [] and raw.zcard(f"{stream}:delayed") == 0
    b.settle(again)
    assert raw.xlen(stream) == 0 and owners(raw, stream) == {}


def test_the_same_consumer_redelivered_is_a_new_delivery(make_queue: MakeQueue, raw: redis.Redis, stream: str) -> None:
    """A consumer that takes its own expired messages again holds a new delivery: the
    settle of the first batch does not touch it."""
    q = make_queue(visibility_timeout=SHORT_LEASE_S)
    q.send("x")
    first = q.receive(1, 0)
    second = q.receive(1, wait_seconds=WAIT_S)
    assert [m.attempts for m in second] == [2]
    first.messages[0].dead_letter(REASON_INVALID, "stale")
    q.settle(first)
    assert q.dlq_list() == [] and list(owners(raw, stream).values()) == [(q.consumer, 2)]
    q.settle(second)
    assert raw.xlen(stream) == 0


# -- release ------------------------------------------------------------------------------


def test_release_makes_a_batch_visible_at_once_without_counting_the_delivery(make_queue: MakeQueue) -> None:
    a, b = make_queue(), make_queue()  # a 30 s lease: only the release can give the messages back
    a.send_batch(["x", "y"])
    batch = a.receive(10, 0)
    assert a.stats() == {"pending": 0, "in_flight": 2, "dlq": 0}
    a.release(batch)
    assert a.stats() == {"pending": 2, "in_flight": 0, "dlq": 0}
    again = b.receive(10, 0)
    assert [m.body for m in again] == ["x", "y"]
    assert [m.attempts for m in again] == [1, 1]
    again.messages[0].retry()
    b.settle(again)
    third = b.receive(10, 0)
    assert [(m.body, m.attempts) for m in third] == [("x", 2)]


def test_release_leaves_settled_messages_alone(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.send_batch(["retried", "acked"])
    batch = q.receive(10, 0)
    batch.messages[0].retry()
    q.settle(batch)
    q.release(batch)
    assert [(m.body, m.attempts) for m in q.receive(10, 0)] == [("retried", 2)]


def test_a_waiting_receive_ends_under_a_frozen_clock(make_queue: MakeQueue) -> None:
    """freezegun freezes the monotonic clock too (in the main thread): the wait still ends,
    once its slices of blocking add up to `wait_seconds`. An alarm fails the test instead
    of letting it hang."""
    q = make_queue()

    def hung(*_: Any) -> None:
        raise AssertionError("the receive kept waiting under a frozen clock")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with freeze_time("2026-11-20T12:00:00Z"):
            assert len(q.receive(10, wait_seconds=0.6)) == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_waiting_receive_takes_what_is_sent_meanwhile(make_queue: MakeQueue) -> None:
    consumer, producer = make_queue(), make_queue()
    received: list[Any] = []
    waiting = threading.Thread(target=lambda: received.extend(consumer.receive(3, wait_seconds=WAIT_S)))
    waiting.start()
    ids = producer.send_batch(["a", "b", "c"])
    waiting.join(timeout=WAIT_S * 2)
    assert not waiting.is_alive()
    assert [(m.id, m.body, m.attempts) for m in received] == [(i, b, 1) for i, b in zip(ids, "abc", strict=True)]


# -- age, delays --------------------------------------------------------------------------


def test_oldest_age_counts_delayed_and_readded_retries(make_queue: MakeQueue) -> None:
    with freeze_time("2026-11-20T12:00:00Z") as frozen:
        q = make_queue()
        assert q.oldest_age_s() == 0.0
        q.send("old")
        frozen.tick(10)
        q.send("new")
        assert q.oldest_age_s() == 10.0
        batch = q.receive(10, 0)
        batch.messages[0].retry(delay_seconds=60)
        q.settle(batch)  # "new" acked, "old" waits in the delayed set
        assert q.stats() == {"pending": 1, "in_flight": 0, "dlq": 0}
        assert q.oldest_age_s() == 10.0
        frozen.tick(60)
        q.send("newest")  # ahead of "old" in the stream once "old" comes back
        assert q.oldest_age_s() == 70.0
        batch = q.receive(10, 0)
        assert [(m.body, m.attempts) for m in batch] == [("newest", 1), ("old", 2)]
        assert q.oldest_age_s() == 70.0  # in flight: still in the queue
        batch.messages[0].retry()
        q.settle(batch)  # "old" acked, "newest" back in the stream
        frozen.tick(5)
        assert q.oldest_age_s() == 5.0
        q.settle(q.receive(10, 0))
        assert q.oldest_age_s() == 0.0


# -- consumers in threads -----------------------------------------------------------------


def test_concurrent_waiting_consumers_never_share_a_message(make_queue: MakeQueue) -> None:
    """Three consumers wait in XREADGROUP BLOCK while a producer sends in batches: every
    message is received exactly once."""
    producer, consumers = make_queue(), [make_queue() for _ in range(3)]
    total, per_send = 1000, 50
    got: list[list[str]] = [[] for _ in consumers]
    sent: list[str] = []
    attempts: set[int] = set()
    errors: list[BaseException] = []
    lock, done = threading.Lock(), threading.Event()
    start = threading.Barrier(len(consumers) + 1)

    def produce() -> None:
        try:
            start.wait()
            for i in range(0, total, per_send):
                sent.extend(producer.send_batch([{"n": n} for n in range(i, i + per_send)]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            done.set()

    def consume(k: int) -> None:
        try:
            start.wait()
            while not done.is_set():
                batch = consumers[k].receive(64, wait_seconds=0.5)
                got[k] += [m.id for m in batch]
                attempts.update(m.attempts for m in batch)
                consumers[k].settle(batch)
                with lock:
                    if sum(map(len, got)) >= total:
                        done.set()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=produce)] + [
        threading.Thread(target=consume, args=(k,)) for k in range(len(consumers))
    ]
    for t in threads:
        t.start()
    done.wait(timeout=120)
    done.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    received = [mid for ids in got for mid in ids]
    assert len(received) == len(set(received))
    assert attempts == {1}  # no delivery was lost and taken again after its lease
    assert sorted(received) == sorted(sent) and len(sent) == total
    assert producer.stats() == {"pending": 0, "in_flight": 0, "dlq": 0}


# -- the DLQ ------------------------------------------------------------------------------


def dead_letter_all(q: RedisQueue, n: int) -> list[str]:
    ids = q.send_batch([{"n": i} for i in range(n)])
    batch = q.receive(n, 0)
    for m in batch:
        m.dead_letter(REASON_INVALID, f"n: bad {m.body['n']}")
    q.settle(batch)
    return ids


def test_concurrent_redrives_take_each_letter_once(make_queue: MakeQueue, raw: redis.Redis, stream: str) -> None:
    a, b = make_queue(), make_queue()
    ids = dead_letter_all(a, 1200)
    counts: list[int] = []
    start = threading.Barrier(2)

    def redrive(q: RedisQueue) -> None:
        start.wait()
        counts.append(q.dlq_redrive())

    threads = [threading.Thread(target=redrive, args=(q,)) for q in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(counts) == 1200 and len(counts) == 2
    back = a.receive(2000, 0)
    assert sorted(m.id for m in back) == sorted(ids)  # each once, ids kept
    assert {m.attempts for m in back} == {1}
    assert a.rejected_totals()[REASON_INVALID] == 0 and a.dlq_list() == []


def test_concurrent_purges_delete_each_letter_once(make_queue: MakeQueue) -> None:
    a, b = make_queue(), make_queue()
    dead_letter_all(a, 1100)
    counts: list[int] = []
    start = threading.Barrier(2)

    def purge(q: RedisQueue) -> None:
        start.wait()
        counts.append(q.dlq_purge())

    threads = [threading.Thread(target=purge, args=(q,)) for q in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(counts) == 1100 and len(counts) == 2
    assert a.stats() == {"pending": 0, "in_flight": 0, "dlq": 0}
    assert a.rejected_totals()[REASON_INVALID] == 1100  # a purge keeps the count


def test_redrive_limit_and_filters_span_chunks(make_queue: MakeQueue) -> None:
    with freeze_time("2026-11-20T12:00:00Z") as frozen:
        q = make_queue()
        dead_letter_all(q, 700)
        cutoff = frozen().timestamp() + 1
        frozen.tick(2)
        dead_letter_all(q, 5)
        assert len(q.dlq_list(limit=1000)) == 705
        assert len(q.dlq_list(limit=1000, before=cutoff)) == 700
        assert q.dlq_redrive(limit=650, before=cutoff) == 650
        assert q.dlq_redrive(limit=650, before=cutoff) == 50
        assert q.dlq_redrive(before=cutoff) == 0
        assert q.dlq_purge(reason="too_late") == 0
        assert q.dlq_purge(reason=REASON_INVALID) == 5
        assert q.stats() == {"pending": 700, "in_flight": 0, "dlq": 0}


def test_array_elements_reach_the_dlq_only_with_an_ack(make_queue: MakeQueue) -> None:
    q = make_queue()
    mid = q.send([{"n": 0}, {"n": 1}, {"n": 2}])
    batch = q.receive(1, 0)
    batch.messages[0].dead_letter_part(1, "too_late", "ts: too old")
    q.settle(batch, failure="RuntimeError: rolled back")  # retried whole: its parts wait
    assert q.dlq_list() == []
    batch = q.receive(1, 0)
    batch.messages[0].dead_letter_part(1, "too_late", "ts: too old")
    q.settle(batch)
    (letter,) = q.dlq_list()
    assert (letter["message_id"], letter["body"], letter["attempts"]) == (f"{mid}:1", '{"n":1}', 2)
    assert q.stats() == {"pending": 0, "in_flight": 0, "dlq": 1, "dlq_too_late": 1}


# -- housekeeping -------------------------------------------------------------------------


def test_the_stream_is_left_clean(make_queue: MakeQueue, raw: redis.Redis, stream: str) -> None:
    with freeze_time("2026-11-20T12:00:00Z") as frozen:
        q = make_queue()
        q.send_batch([{"n": i} for i in range(6)])
        batch = q.receive(10, 0)
        batch.messages[0].dead_letter(REASON_INVALID, "bad")
        batch.messages[1].retry(delay_seconds=30)
        batch.messages[2].retry()
        q.settle(batch)
        frozen.tick(30)
        q.settle(q.receive(10, 0))
        assert q.dlq_redrive() == 1
        q.settle(q.receive(10, 0))
        dead_letter_all(q, 2)
        assert q.dlq_purge() == 2
        assert q.stats() == {"pending": 0, "in_flight": 0, "dlq": 0} and q.oldest_age_s() == 0.0
    assert raw.xlen(stream) == 0 and owners(raw, stream) == {}
    assert sorted(k.decode() for k in raw.scan_iter(match=f"{stream}*")) == sorted(
        [stream, f"{stream}:dlq", f"{stream}:dlq:totals"]
    )
    assert raw.xlen(f"{stream}:dlq") == 0
    assert [c["name"].decode() for c in raw.xinfo_consumers(stream, GROUP)] == [q.consumer]
    q.close()
    assert raw.xinfo_consumers(stream, GROUP) == []  # a consumer that holds nothing leaves the group


def test_the_group_is_created_when_missing(make_queue: MakeQueue) -> None:
    q = make_queue(ensure=False)
    q.send("before the group")
    assert [m.body for m in q.receive(10, 0)] == ["before the group"]
    q.ensure()
    q.ensure()  # idempotent
    assert q.stats() == {"pending": 0, "in_flight": 1, "dlq": 0}


def test_from_url(redis_server_url: str) -> None:
    with pytest.raises(ConfigError, match="stream") as info:
        RedisQueue.from_url("redis://:hunter2@127.0.0.1:6379/0", QueueSettings())
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        RedisQueue.from_url("redis://:hunter2@127.0.0.1:6379/0?stream=events&socket_timeout=soon", QueueSettings())
    assert "hunter2" not in str(info.value)
    q = RedisQueue.from_url(f"{redis_server_url}?socket_timeout=7&stream=events", QueueSettings())
    assert q.name == "events"
    assert q.client.connection_pool.connection_kwargs["socket_timeout"] == 7
    q.close()


def test_an_unreachable_server_is_a_transient_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = RedisQueue.from_url(f"redis://127.0.0.1:{port}/0?stream=events", QueueSettings())
    with pytest.raises(TransientError):
        q.send("x")
    with pytest.raises(TransientError):
        q.receive(10, 0)
    q.close()
