"""What the HTTP layer and the monitor ask a queue goes through the Queue interface:
lag, dead letters per reason, and the cheap depth reading behind backpressure."""

from __future__ import annotations

from freezegun import freeze_time

from pipeline.bindings.queue import REASON_INVALID
from pipeline.env import Env


def test_oldest_age_and_dlq_counts(env: Env) -> None:
    with freeze_time("2026-11-20T12:00:00Z") as frozen:
        assert env.QUEUE.oldest_age_s() == 0.0
        env.QUEUE.send_batch(["a", "b"])
        frozen.tick(42)
        env.QUEUE.send("c")
        assert env.QUEUE.oldest_age_s() == 42.0
        batch = env.QUEUE.receive(1)
        batch.messages[0].dead_letter(REASON_INVALID, "x: bad")
        env.QUEUE.settle(batch)
        assert env.QUEUE.dlq_counts() == {"invalid": 1}
        assert env.QUEUE.oldest_age_s() == 42.0  # "b" is the oldest left


def test_depth_estimate_bounds_then_counts(env: Env) -> None:
    env.QUEUE.send_batch([str(i) for i in range(10)])
    batch = env.QUEUE.receive(10)
    for m in batch.messages[1:9]:  # leave a gap: the first and the last stay
        m.ack()
    for m in (batch.messages[0], batch.messages[9]):
        m.retry(delay_seconds=0)
    env.QUEUE.settle(batch)
    assert env.QUEUE.depth() == 2
    assert env.QUEUE.depth_estimate(limit=100) == (10, False)  # the span: an upper bound
    assert env.QUEUE.depth_estimate(limit=5) == (2, True)  # past the limit: counted
