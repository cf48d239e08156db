"""Exactly-once aggregates: duplicates, redeliveries, failures between the insert and the
commit, and consumers that die holding a batch never make an event count twice (or not at
all). The expected aggregates are computed independently in tests/traffic_truth.py."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.traffic import TrafficConsumer
from pipeline import migrate
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.worker import Worker
from tests.conftest import MakeEnv
from tests.faults import NOW, NOW_MS, Crash, FaultyHandler
from tests.traffic_truth import (
    Truth,
    assert_aggregates_equal,
    expected_aggregates,
    make_events,
    stored_event_keys,
)


def deliveries(pairs: list[tuple[dict[str, Any], Truth]], seed: int) -> list[dict[str, Any]]:
    """Every event once, a third of them two or three times, shuffled."""
    rng = random.Random(seed)
    out = []
    for body, _ in pairs:
        copies = rng.choice((2, 3)) if rng.random() < 1 / 3 else 1
        out += [body] * copies
    rng.shuffle(out)
    return out


def drain(worker: Worker, frozen: Any, visibility: float) -> tuple[int, int]:
    """Step until the queue is empty; after a crash, let the leases expire."""
    ok = failed = 0
    while True:
        try:
            result = worker.step(wait=0)
        except Crash:
            failed += 1
            frozen.tick(visibility + 1)
            continue
        if result is None:
            if worker.env.QUEUE.depth() == 0:
                worker.ctx.close()  # wait for background work (snapshot refreshes) to finish
                return ok, failed
            frozen.tick(visibility + 1)  # only leased messages left: wait out the lease
            continue
        ok += result.ok
        failed += not result.ok


@pytest.mark.parametrize(
    ("db_url", "n"),
    [("sqlite", 20_000), pytest.param("postgres", 5_000, marks=pytest.mark.postgres)],
    indirect=["db_url"],
)
def test_exactly_once_with_duplicates_and_failures(n: int, db_url: str, make_env: MakeEnv) -> None:
    with freeze_time(NOW) as frozen:
        env = make_env(db_url, consumer={"max_batch_size": 100, "max_retries": 20, "visibility_timeout": 30})
        pairs = make_events(seed=1, n=n, now_ms=NOW_MS)
        sent = deliveries(pairs, seed=2)
        assert len(sent) > n * 1.5
        for i in range(0, len(sent), 1000):
            env.QUEUE.send_batch(sent[i : i + 1000])

        handler = FaultyHandler(env.config, fail=set(range(3, 10_000, 7)), crash={5, 40, 41, 90})
        _, failed = drain(Worker(env, handler), frozen, 30)
        assert failed > len(sent) // 100 // 7  # the injection really happened
        assert env.QUEUE.stats() == {"pending": 0, "in_flight": 0, "dlq": 0}

        truths = [t for _, t in pairs]
        assert len(stored_event_keys(env.DB)) == n
        assert sorted(stored_event_keys(env.DB)) == sorted((t.ts, t.id) for t in truths)
        expected = expected_aggregates(truths)
        assert_aggregates_equal(env.DB, expected)

        # re-ingesting a sample of the same events changes nothing
        env.QUEUE.send_batch([body for body, _ in pairs[: n // 10]])
        drain(Worker(env, TrafficConsumer(env.config).handle_batch), frozen, 30)
        assert len(stored_event_keys(env.DB)) == n
        assert_aggregates_equal(env.DB, expected)


def test_ground_truth_can_fail(sqlite_url: str, make_env: MakeEnv) -> None:
    """The comparison notices one event too many or too few."""
    with freeze_time(NOW) as frozen:
        env = make_env(sqlite_url)
        pairs = make_events(seed=3, n=50, now_ms=NOW_MS)
        env.QUEUE.send_batch([b for b, _ in pairs])
        drain(Worker(env, TrafficConsumer(env.config).handle_batch), frozen, 30)
        truths = [t for _, t in pairs]
        assert_aggregates_equal(env.DB, expected_aggregates(truths))
        with pytest.raises(AssertionError):
            assert_aggregates_equal(env.DB, expected_aggregates(truths[1:]))
        with pytest.raises(AssertionError):
            assert_aggregates_equal(env.DB, expected_aggregates([*truths, truths[0]]))


def test_new_events_after_a_redelivered_batch_are_counted(sqlite_url: str, make_env: MakeEnv) -> None:
    """After a batch of nothing but duplicates the consumer counts stored keys before it
    inserts; the next batches, half new and all new, still store and count exactly their
    new events."""
    with freeze_time(NOW):
        env = make_env(sqlite_url, consumer={"max_batch_size": 10})
        pairs = make_events(seed=5, n=25, now_ms=NOW_MS)
        bodies = [b for b, _ in pairs]
        for part in (bodies[:10], bodies[:10], bodies[5:15], bodies[15:25]):
            env.QUEUE.send_batch(part)
        worker = Worker(env, TrafficConsumer(env.config).handle_batch)
        reports = []
        while (result := worker.step(wait=0)) is not None:
            reports.append((result.report.inserted, result.report.duplicates))
        assert reports == [(10, 0), (0, 10), (5, 5), (10, 0)]
        assert_aggregates_equal(env.DB, expected_aggregates([t for _, t in pairs]))


# -- property: random interleavings ------------------------------------------------------

plans = st.fixed_dictionaries(
    {
        "n": st.integers(1, 40),
        "seed": st.integers(0, 2**32),
        "copies": st.lists(st.integers(1, 3), min_size=40, max_size=40),
        "batch_size": st.integers(1, 12),
        "fail": st.sets(st.integers(0, 30), max_size=10),
        "crash": st.sets(st.integers(0, 30), max_size=3),
        "order": st.randoms(use_true_random=False),
        "resend_all": st.booleans(),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
def test_exactly_once_property(plan: dict[str, Any]) -> None:
    pairs = make_events(seed=plan["seed"], n=plan["n"], now_ms=NOW_MS, span_ms=5 * 3_600_000)
    sent = [body for (body, _), k in zip(pairs, plan["copies"], strict=False) for _ in range(k)]
    plan["order"].shuffle(sent)
    with tempfile.TemporaryDirectory() as tmp, freeze_time(NOW) as frozen:
        cfg = Config().replace(
            bindings={"db": f"sqlite:///{Path(tmp) / 'e.db'}", "archive": f"file://{tmp}/archive"},
            consumer={"max_batch_size": plan["batch_size"], "max_batch_timeout": 0, "max_retries": 100},
        )
        env = open_env(cfg, check_schema=False)
        try:
            migrate.upgrade(env.DB)
            env.QUEUE.send_batch(sent)
            drain(Worker(env, FaultyHandler(cfg, plan["fail"], plan["crash"])), frozen, cfg.consumer.visibility_timeout)
            if plan["resend_all"]:
                env.QUEUE.send_batch(sent)
                drain(Worker(env, TrafficConsumer(cfg).handle_batch), frozen, cfg.consumer.visibility_timeout)
            truths = [t for _, t in pairs]
            assert env.QUEUE.stats() == {"pending": 0, "in_flight": 0, "dlq": 0}
            assert sorted(stored_event_keys(env.DB)) == sorted((t.ts, t.id) for t in truths)
            assert_aggregates_equal(env.DB, expected_aggregates(truths))
        finally:
            env.close()
