"""The aggregate definition: what an hourly row of `path_stats_hourly` holds and how events
fold into it. The consumer folds the events it inserted; archive replay and rebuild fold
archived rows with the same function, so both always agree."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from pipeline.histogram import N_BUCKETS
from pipeline.schema import BUCKET_COLUMNS, LATENCY_BUCKETS_MS, STATUS_COLUMNS

AGG_KEYS = ("hour", "host", "path", "method")
# An accumulator list in `fold` holds AGG_COLUMNS in order: requests (0), status classes
# 1xx-5xx (1-5), bytes (6), rt sum (7), min (8), max (9), then the latency buckets (10-).
AGG_COLUMNS = ("requests", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms", "rt_min_ms", "rt_max_ms", *BUCKET_COLUMNS)


Acc = dict[tuple[int, str, str, str], list[Any]]


def fold(acc: Acc, rows: Iterable[tuple[int, str, str, str, int, int | None, float]]) -> None:
    """Add `(ts, host, aggregated path, method, status, bytes, response_time_ms)` rows into
    `acc`: (hour, host, path, method) → values in `AGG_COLUMNS` order. The one definition
    of an aggregate row: the consumer folds the events it inserted, archive replay and
    rebuild fold archived rows. Accumulators merge by addition (min/max aside)."""
    buckets, get, zeros = LATENCY_BUCKETS_MS, acc.get, [0] * N_BUCKETS
    for ts, host, path, method, status, nbytes, rt in rows:  # indices: see AGG_COLUMNS
        key = (ts // 3_600_000 * 3600, host, path, method)  # clock.hour_of_ms, inlined: runs per event
        a = get(key)
        if a is None:
            a = acc[key] = [0, 0, 0, 0, 0, 0, 0, 0.0, rt, rt, *zeros]
        a[0] += 1
        a[status // 100] += 1  # status_1xx … status_5xx sit at 1 … 5
        if nbytes:
            a[6] += nbytes
        a[7] += rt
        if rt < a[8]:
            a[8] = rt
        elif rt > a[9]:
            a[9] = rt
        a[10 + bisect_left(buckets, rt)] += 1
