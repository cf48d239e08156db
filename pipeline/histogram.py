"""Latency histograms as fixed integer columns: they merge across hours by addition, and
percentiles are estimated by linear interpolation inside the bucket that holds the rank,
clamped to the observed min and max. The error is bounded by the bucket's width."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from pipeline.schema import LATENCY_BUCKETS_MS

N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1


def bucket_index(ms: float) -> int:
    """Index of the bucket `(upper[i-1], upper[i]]` holding `ms`; the last is overflow."""
    return bisect_left(LATENCY_BUCKETS_MS, ms)


def percentile(counts: Sequence[int], q: float, lo: float, hi: float) -> float | None:
    """Estimate the q-quantile (0 < q ≤ 1) from bucket counts and the observed min/max."""
    return percentiles(counts, (q,), lo, hi)[0]


def percentiles(counts: Sequence[int], qs: Sequence[float], lo: float, hi: float) -> list[float | None]:
    """`percentile` for several ascending quantiles in one pass over the buckets."""
    total = sum(counts)
    if total == 0:
        return [None] * len(qs)
    out: list[float | None] = []
    ranks = iter([q * total for q in qs])
    rank = next(ranks)
    seen = 0
    for i, n in enumerate(counts):
        while n and seen + n >= rank:
            lower = 0.0 if i == 0 else float(LATENCY_BUCKETS_MS[i - 1])
            upper = float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else hi
            lower, upper = max(lower, lo), min(upper, hi)
            value = lower + (upper - lower) * (rank - seen) / n
            out.append(min(max(round(value, 3), lo), hi))  # rounding must not leave [min, max]
            if len(out) == len(qs):
                return out
            rank = next(ranks)
        seen += n
    return out + [hi] * (len(qs) - len(out))
