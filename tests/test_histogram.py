"""Latency histograms: percentile estimates against exact percentiles (computed here, without
numpy) within the bucket error, and merging across hours by plain addition."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.traffic import TrafficConsumer
from pipeline import clock, queries
from pipeline.env import Env
from pipeline.histogram import N_BUCKETS, bucket_index, percentile, percentiles
from pipeline.schema import BUCKET_COLUMNS, LATENCY_BUCKETS_MS
from pipeline.worker import Worker

QUANTILES = (0.5, 0.95, 0.99)


def counts_of(values: Sequence[float]) -> list[int]:
    counts = [0] * N_BUCKETS
    for v in values:
        # written independently of bucket_index: (upper[i-1], upper[i]], the first from 0
        i = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if v <= b), len(LATENCY_BUCKETS_MS))
        counts[i] += 1
    return counts


def exact(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the ceil(q·n)-th smallest value."""
    ordered = sorted(values)
    k = max(1, math.ceil(q * len(ordered)))
    return ordered[k - 1]


def bucket_bounds(v: float) -> tuple[float, float]:
    i = counts_of([v]).index(1)
    lower = 0.0 if i == 0 else float(LATENCY_BUCKETS_MS[i - 1])
    upper = float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else math.inf
    return lower, upper


def assert_within_bucket(values: Sequence[float], q: float) -> None:
    lo, hi = min(values), max(values)
    estimate = percentile(counts_of(values), q, lo, hi)
    assert estimate is not None
    truth = exact(values, q)
    lower, upper = bucket_bounds(truth)
    lower, upper = max(lower, lo), min(upper, hi)
    assert lower - 1e-3 <= estimate <= upper + 1e-3, (q, truth, estimate, lower, upper)
    assert lo <= estimate <= hi


def test_bucket_index_edges() -> None:
    assert bucket_index(0) == 0
    assert bucket_index(1) == 0
    assert bucket_index(1.0001) == 1
    assert bucket_index(2) == 1
    assert bucket_index(60_000) == len(LATENCY_BUCKETS_MS) - 1
    assert bucket_index(60_000.5) == len(LATENCY_BUCKETS_MS)
    assert bucket_index(1e9) == N_BUCKETS - 1
    assert len(BUCKET_COLUMNS) == N_BUCKETS
    for v in (0, 0.5, 1, 3, 7, 10, 99, 100, 101, 4999, 61_000):
        assert counts_of([v])[bucket_index(v)] == 1


def test_empty_histogram_has_no_percentile() -> None:
    assert percentile([0] * N_BUCKETS, 0.5, 0, 0) is None


def test_single_value_is_exact() -> None:
    for v in (0.0, 0.3, 1.0, 37.5, 250.0, 75_000.0):
        for q in QUANTILES:
            assert percentile(counts_of([v]), q, v, v) == v


def test_constant_values_are_exact() -> None:
    values = [42.0] * 1000
    for q in QUANTILES:
        assert percentile(counts_of(values), q, 42.0, 42.0) == 42.0


def test_known_distribution() -> None:
    # 1..1000 ms uniformly: p50 ≈ 500, p95 ≈ 950, p99 ≈ 990, each within its bucket
    values = [float(i) for i in range(1, 1001)]
    for q in QUANTILES:
        assert_within_bucket(values, q)
    p50 = percentile(counts_of(values), 0.5, 1, 1000)
    assert p50 is not None and 200 < p50 <= 500


def test_overflow_bucket_uses_the_max() -> None:
    values = [10.0] * 50 + [70_000.0] * 40 + [90_000.0] * 10
    p99 = percentile(counts_of(values), 0.99, 10.0, 90_000.0)
    assert p99 is not None and 60_000 < p99 <= 90_000
    assert percentile(counts_of(values), 1.0, 10.0, 90_000.0) == 90_000.0


@pytest.mark.parametrize("seed", range(8))
def test_random_lognormal_latencies(seed: int) -> None:
    rng = random.Random(seed)
    values = [round(rng.lognormvariate(3.3, 1.2), 2) for _ in range(rng.randint(1, 3000))]
    for q in QUANTILES:
        assert_within_bucket(values, q)


latencies = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=120_000, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, *map(float, LATENCY_BUCKETS_MS)]),  # exactly on the edges
    ),
    min_size=1,
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(values=latencies, q=st.sampled_from([0.01, 0.25, *QUANTILES, 1.0]))
def test_estimate_lies_in_the_bucket_of_the_exact_value(values: list[float], q: float) -> None:
    assert_within_bucket(values, q)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(latencies, min_size=1, max_size=6))
def test_merged_histograms_equal_one_histogram(parts: list[list[float]]) -> None:
    """Per-hour rows summed column by column, with min of mins and max of maxes, give the
    same percentiles as one histogram over all the values."""
    merged = [sum(col) for col in zip(*(counts_of(p) for p in parts), strict=True)]
    everything = [v for p in parts for v in p]
    assert merged == counts_of(everything)
    lo = min(min(p) for p in parts)
    hi = max(max(p) for p in parts)
    for q in QUANTILES:
        assert percentile(merged, q, lo, hi) == percentile(counts_of(everything), q, min(everything), max(everything))
        assert_within_bucket(everything, q)


def test_stored_hourly_rows_merge_into_top_paths(env: Env) -> None:
    """Through the database: events over five hours for one path; `top_paths` sums the
    hourly rows, and its percentiles equal those of one histogram over all values."""
    rng = random.Random(7)
    now_ms = clock.now_ms()
    base = now_ms - now_ms % 3_600_000 - 5 * 3_600_000
    values: list[float] = []
    per_hour: dict[int, list[float]] = {}
    bodies = []
    for i in range(1500):
        hour = i % 5
        rt = round(rng.lognormvariate(3 + hour * 0.5, 1.0), 3)
        ts = base + hour * 3_600_000 + rng.randint(0, 3_599_999)
        values.append(rt)
        per_hour.setdefault(ts // 3_600_000 * 3600, []).append(rt)
        bodies.append({"id": f"e{i}", "ts": ts, "method": "GET", "path": "/api/items", "status": 200,
                       "response_time_ms": rt})  # fmt: skip
    env.QUEUE.send_batch(bodies)
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    while worker.step(wait=0) is not None:
        pass
    worker.ctx.close()

    hourly = list(queries.hourly(env.DB, path="/api/items"))
    assert len(hourly) == 5
    for row in hourly:
        hour_values = per_hour[int(clock.parse_time(row["hour"]))]
        assert row["requests"] == len(hour_values)
        assert row["rt_min_ms"] == min(hour_values) and row["rt_max_ms"] == max(hour_values)
        for q in QUANTILES:
            lo, hi = min(hour_values), max(hour_values)
            assert row[f"p{round(q * 100)}_ms"] == percentile(counts_of(hour_values), q, lo, hi)

    (top,) = queries.top_paths(env.DB, hours=24, limit=5)
    assert top["requests"] == len(values)
    assert top["rt_min_ms"] == min(values) and top["rt_max_ms"] == max(values)
    assert top["rt_sum_ms"] == pytest.approx(sum(values))
    for q in QUANTILES:
        estimate = top[f"p{round(q * 100)}_ms"]
        assert estimate == percentile(counts_of(values), q, min(values), max(values))
        lower, upper = bucket_bounds(exact(values, q))
        assert max(lower, min(values)) - 1e-3 <= estimate <= min(upper, max(values)) + 1e-3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=N_BUCKETS, max_size=N_BUCKETS),
    st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
    st.floats(0, 100),
    st.floats(100, 100_000),
)
def test_percentiles_in_one_pass_equal_one_at_a_time(counts: list[int], qs: list[float], lo: float, hi: float) -> None:
    qs = sorted(qs)
    assert percentiles(counts, qs, lo, hi) == [percentile(counts, q, lo, hi) for q in qs]
