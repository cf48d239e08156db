"""The dashboard's numbers over a time range: totals (the tiles), one series point per hour
(or day) that has traffic, and the busiest paths with a sparkline each (requests in every
bucket of the range, empty ones included). `GET /v1/overview`
and `edgepipe report` both call `overview`.

Everything is summed from the aggregate tables, percentiles included: the latency
histogram columns of the rows in a bucket (or of a path, or of the whole range) are added
up and `pipeline.histogram.percentiles` estimates p50/p95/p99 from the sum, as the top
paths and the snapshots do.

Hour or day buckets: with `[retention] hourly_days` the `rollup` job prunes the hourly rows
of old days once their daily rows (`path_stats_daily`) hold them, and records where
(`meta.HOURLY_PRUNED_BEFORE`). A range that starts before that point is answered in day
buckets (`source` "daily": the daily rows of the pruned days, the hourly rows of the later
days summed per day); any other range in hour buckets from the hourly rows (`source`
"hourly"). Ranges are aligned outwards to whole buckets and returned as such (`from`, `to`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.bindings.db import Database
from pipeline.errors import ValidationError
from pipeline.histogram import percentiles
from pipeline.queries import SUMMED
from pipeline.schema import BUCKET_COLUMNS, STATUS_COLUMNS, path_stats_daily, path_stats_hourly

HOUR_S = 3600
DAY_S = 86_400
DEFAULT_RANGE_S = 24 * HOUR_S
MAX_RANGE_DAYS = 366
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Window:
    """A range aligned to its buckets: [start, end), `bucket_s` 3600 or 86400."""

    start: int
    end: int
    bucket_s: int
    pruned_before: int  # hourly rows before this were pruned; daily rows hold those days

    @property
    def source(self) -> str:
        return "daily" if self.bucket_s == DAY_S else "hourly"


def _floor(t: float, unit: int) -> int:
    return int(t) // unit * unit


def _ceil(t: float, unit: int) -> int:
    return -(-math.ceil(t) // unit) * unit


def window(start: float | None, end: float | None, pruned_before: int, now_s: float) -> Window:
    """The range to read: by default the last 24 hours (the current one included); only
    `end` given: the 24 hours before it; only `start`: up to the end of the current hour. ValidationError (naming
    `from` or `to`) for an empty or reversed range or one longer than MAX_RANGE_DAYS."""
    if end is None:
        end = _floor(now_s, HOUR_S) + HOUR_S
    if start is None:
        start = end - DEFAULT_RANGE_S
    if end <= start:
        raise ValidationError("to", f"must be after from ({clock.iso(start)})")
    if end - start > MAX_RANGE_DAYS * DAY_S:
        raise ValidationError("from", f"the range is at most {MAX_RANGE_DAYS} days")
    bucket = DAY_S if pruned_before and start < pruned_before else HOUR_S
    return Window(_floor(start, bucket), _ceil(end, bucket), bucket, pruned_before)


def _parts(w: Window) -> list[tuple[sa.Table, sa.ColumnElement[Any], int, int]]:
    """(table, period column, lo, hi) of the rows that make up the window."""
    out: list[tuple[sa.Table, sa.ColumnElement[Any], int, int]] = []
    if w.start < w.pruned_before:
        out.append((path_stats_daily, path_stats_daily.c.day, w.start, min(w.end, w.pruned_before)))
    lo = max(w.start, w.pruned_before)
    if lo < w.end:
        out.append((path_stats_hourly, path_stats_hourly.c.hour, lo, w.end))
    return out


def _where(table: sa.Table, period: Any, lo: int, hi: int, host: str | None, path: str | None) -> list[Any]:
    conds = [period >= lo, period < hi]
    if host is not None:
        conds.append(table.c.host == host)
    if path is not None:
        conds.append(table.c.path == path)
    return conds


def _sums(table: sa.Table) -> list[Any]:
    # cast: PostgreSQL's SUM of a bigint is a numeric (Decimal)
    return [
        *(sa.cast(sa.func.sum(table.c[c]), table.c[c].type).label(c) for c in SUMMED),
        sa.func.min(table.c.rt_min_ms).label("rt_min_ms"),
        sa.func.max(table.c.rt_max_ms).label("rt_max_ms"),
    ]


def _add(acc: dict[Any, dict[str, Any]], key: Any, row: Any) -> None:
    """Add an aggregate row (its summed columns, min and max) into acc[key]."""
    into = acc.get(key)
    if into is None:
        acc[key] = {c: row[c] for c in (*SUMMED, "rt_min_ms", "rt_max_ms")}
        return
    for c in SUMMED:
        into[c] += row[c]
    into["rt_min_ms"] = min(into["rt_min_ms"], row["rt_min_ms"])
    into["rt_max_ms"] = max(into["rt_max_ms"], row["rt_max_ms"])


def _rate(n: int, of: int) -> float:
    return round(n / of, 6) if of else 0.0


def _figures(acc: dict[str, Any]) -> dict[str, Any]:
    """Public figures of summed aggregate columns: counts, rates, bytes, percentiles."""
    n = acc["requests"]
    p50, p95, p99 = percentiles([acc[c] for c in BUCKET_COLUMNS], (0.5, 0.95, 0.99), acc["rt_min_ms"], acc["rt_max_ms"])
    return {
        "requests": n,
        **{c: acc[c] for c in STATUS_COLUMNS},
        "rate_4xx": _rate(acc["status_4xx"], n),
        "rate_5xx": _rate(acc["status_5xx"], n),
        "error_rate": _rate(acc["status_4xx"] + acc["status_5xx"], n),
        "bytes": acc["bytes_sum"],
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def _total(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    acc: dict[int, dict[str, Any]] = {}
    for row in rows:
        _add(acc, 0, row)
    return acc.get(0) or {**dict.fromkeys(SUMMED, 0), "rt_min_ms": 0.0, "rt_max_ms": 0.0}


def _hosts(conn: sa.Connection, w: Window) -> list[str]:
    found: set[str] = set()
    for table, period, lo, hi in _parts(w):
        found.update(conn.execute(sa.select(table.c.host).distinct().where(period >= lo, period < hi)).scalars())
    return sorted(found)


def _known_host(conn: sa.Connection, host: str) -> bool:
    return any(
        conn.execute(sa.select(sa.literal(1)).select_from(t).where(t.c.host == host).limit(1)).first()
        for t in (path_stats_hourly, path_stats_daily)
    )


def overview(
    db: Database,
    start: float | None = None,
    end: float | None = None,
    host: str | None = None,
    path: str | None = None,
    limit: int = 20,
    now_s: float | None = None,
) -> dict[str, Any]:
    """Totals, series and top `limit` paths of [start, end) (epoch seconds; see `window`),
    of one host and/or one path when given. A host never seen in the aggregates is a
    ValidationError; a known host or a path without traffic in the range gives zeros."""
    now_s = clock.now_s() if now_s is None else now_s
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationError("limit", f"between 1 and {MAX_LIMIT}")
    with db.read() as conn:
        w = window(start, end, meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE), now_s)
        hosts = _hosts(conn, w)
        if host is not None and host not in hosts and not _known_host(conn, host):
            raise ValidationError("host", f"no traffic was ever seen for host {host!r}")
        series: dict[int, dict[str, Any]] = {}
        by_path: dict[str, dict[str, Any]] = {}
        for table, period, lo, hi in _parts(w):
            cond = _where(table, period, lo, hi, host, path)
            per_period = sa.select(period.label("t"), *_sums(table)).where(*cond).group_by(period)
            for r in conn.execute(per_period).mappings():
                _add(series, _floor(r["t"], w.bucket_s), r)
            per_path = sa.select(table.c.path, *_sums(table)).where(*cond).group_by(table.c.path)
            for r in conn.execute(per_path).mappings():
                _add(by_path, r["path"], r)
        top = sorted(by_path, key=lambda p: (-by_path[p]["requests"], p))[:limit]
        spark = {p: [0] * ((w.end - w.start) // w.bucket_s) for p in top}
        for table, period, lo, hi in _parts(w) if top else ():
            stmt = (
                sa.select(table.c.path, period, sa.func.sum(table.c.requests))
                .where(*_where(table, period, lo, hi, host, path), table.c.path.in_(top))
                .group_by(table.c.path, period)
            )
            for p, t, n in conn.execute(stmt):
                spark[p][(t - w.start) // w.bucket_s] += int(n)
    totals = _figures(_total(series.values()))
    totals["distinct_paths"] = len(by_path)
    return {
        "from": clock.iso(w.start),
        "to": clock.iso(w.end),
        "source": w.source,
        "bucket_s": w.bucket_s,
        "generated_at": clock.iso(int(now_s)),
        "host": host,
        "path": path,
        "hosts": hosts,
        "totals": totals,
        "series": [{"t": clock.iso(t), **_figures(series[t])} for t in sorted(series)],
        "paths": [{"path": p, **_figures(by_path[p]), "spark": spark[p]} for p in top],
    }
