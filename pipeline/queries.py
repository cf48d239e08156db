"""Read side: hourly rows and top paths from `path_stats_hourly`, daily rows from
`path_stats_daily`, with percentile estimates.

Row field names here are the public ones: the CLI's `--json`, the HTTP API and snapshots
all use them. Daily rows have the hourly rows' shape, `day` (00:00 UTC) for `hour`.

The hourly readers (`hourly`, `top_paths`, hence the snapshots) read recent windows; with
`[retention] hourly_days` the hourly rows of older days are pruned (their daily rows hold
them), so a window reaching further back counts only the hourly rows still kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.histogram import percentiles
from pipeline.schema import BUCKET_COLUMNS, STATUS_COLUMNS, path_stats_daily, path_stats_hourly

SUMMED = ("requests", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms", *BUCKET_COLUMNS)


def _plain(mapping: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's are a str subclass that orjson
    refuses)."""
    return {str(k): v for k, v in mapping.items()}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """Replace histogram columns by p50/p95/p99 and add the average."""
    counts = [row.pop(c) for c in BUCKET_COLUMNS]
    lo, hi = row["rt_min_ms"], row["rt_max_ms"]
    n = row["requests"]
    row["rt_avg_ms"] = round(row["rt_sum_ms"] / n, 3) if n else None
    row["p50_ms"], row["p95_ms"], row["p99_ms"] = percentiles(counts, (0.5, 0.95, 0.99), lo, hi)
    return row


def _rows(
    table: sa.Table, unit_s: int, path: str | None, method: str | None, start: float | None, end: float | None,
    host: str | None, limit: int | None, after: tuple[int, str, str, str] | None,
) -> sa.Select[Any]:  # fmt: skip
    """Rows of an aggregate table whose first key column is a period start (`unit_s` long)."""
    period = table.c[table.primary_key.columns.keys()[0]]
    key = (period, table.c.host, table.c.path, table.c.method)
    stmt = sa.select(table).order_by(*key)
    if path is not None:
        stmt = stmt.where(table.c.path == path)
    if method is not None:
        stmt = stmt.where(table.c.method == method.upper())
    if host is not None:
        stmt = stmt.where(table.c.host == host)
    if start is not None:
        stmt = stmt.where(period >= int(start) // unit_s * unit_s)
    if end is not None:
        stmt = stmt.where(period < end)
    if after is not None:
        stmt = stmt.where(sa.tuple_(*key) > sa.tuple_(*after))
    return stmt if limit is None else stmt.limit(limit)


def _read(db: Database, stmt: sa.Select[Any], period: str) -> Iterator[dict[str, Any]]:
    with db.read() as conn:
        for r in conn.execute(stmt).mappings():
            row = _plain(r)
            row[period] = clock.iso(row[period])
            yield _public(row)


def hourly(
    db: Database,
    path: str | None = None,
    method: str | None = None,
    start: float | None = None,
    end: float | None = None,
    host: str | None = None,
    limit: int | None = None,
    after: tuple[int, str, str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Hourly rows ordered by (hour, host, path, method); `start`/`end` are epoch seconds
    (`end` exclusive); `after` is a keyset cursor (the key of the last row seen)."""
    return _read(db, _rows(path_stats_hourly, 3600, path, method, start, end, host, limit, after), "hour")


def daily(
    db: Database,
    path: str | None = None,
    method: str | None = None,
    start: float | None = None,
    end: float | None = None,
    host: str | None = None,
    limit: int | None = None,
    after: tuple[int, str, str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Daily rows (closed UTC days, rolled up by the `rollup` job) ordered by (day, host,
    path, method), `day` an RFC 3339 date-time (00:00 UTC); arguments as for `hourly`,
    `start` taken back to its day's start."""
    return _read(db, _rows(path_stats_daily, 86_400, path, method, start, end, host, limit, after), "day")


def first_hour(hours: int, now_s: float) -> int:
    """The start of the first of the last `hours` UTC hours, the current one included."""
    return int(now_s) // 3600 * 3600 - (hours - 1) * 3600


def _top_statement() -> sa.Select[Any]:
    """The busiest (path, method) pairs of the window with every summed column, as one
    statement: rank the pairs by `requests` alone (a CTE: the `limit` winners), then sum
    the ~30 other columns for the winners only (summing every column for every pair of the
    window costs about four times as much, and the snapshot refresh runs this often). Both
    read a range on `hour`, the leading column of the primary key, so only the window's
    rows are read (what `edgepipe bench snapshot` explains). Binds `first_hour`, `limit`."""
    first = path_stats_hourly.c.hour >= sa.bindparam("first_hour", type_=sa.BigInteger)
    top = (
        sa.select(
            path_stats_hourly.c.path,
            path_stats_hourly.c.method,
            sa.func.sum(path_stats_hourly.c.requests).label("total"),
        )
        .where(first)
        .group_by(path_stats_hourly.c.path, path_stats_hourly.c.method)
        .order_by(sa.desc("total"), path_stats_hourly.c.path, path_stats_hourly.c.method)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .cte("top")
    )
    return (
        sa.select(
            path_stats_hourly.c.path,
            path_stats_hourly.c.method,
            # cast: PostgreSQL's SUM of a bigint is a numeric (Decimal)
            *(sa.cast(sa.func.sum(path_stats_hourly.c[c]), path_stats_hourly.c[c].type).label(c) for c in SUMMED),
            sa.func.min(path_stats_hourly.c.rt_min_ms).label("rt_min_ms"),
            sa.func.max(path_stats_hourly.c.rt_max_ms).label("rt_max_ms"),
        )
        .where(
            first,
            sa.tuple_(path_stats_hourly.c.path, path_stats_hourly.c.method).in_(sa.select(top.c.path, top.c.method)),
        )
        .group_by(path_stats_hourly.c.path, path_stats_hourly.c.method)
    )


TOP_COLUMNS = ("path", "method", *SUMMED, "rt_min_ms", "rt_max_ms")


def top_paths_statement(hours: int, limit: int, now_s: float) -> sa.Select[Any]:
    """`top_paths`' statement with its values bound (for EXPLAIN)."""
    return _top_statement().params(first_hour=first_hour(hours, now_s), limit=limit)


def top_paths(db: Database, hours: int = 24, limit: int = 20, now_s: float | None = None) -> list[dict[str, Any]]:
    """The busiest (path, method) pairs over the last `hours` hours (the current hour
    included), summed over hosts, with merged histograms. Reads only the window's rows.
    One cached statement on the driver cursor (`_top_statement`): the snapshot refresh
    runs this in the background of a busy consumer, and every millisecond it holds the
    interpreter is one the consumer waits."""
    now_s = clock.now_s() if now_s is None else now_s
    stmt = db.cached(("top_paths",), _top_statement)
    with db.read() as conn:
        if not db.in_transaction():
            db.plan_as_small(conn)
        found = db.fetchall(conn, stmt, ("first_hour", "limit"), (first_hour(hours, now_s), limit))
    rows = sorted(
        (dict(zip(TOP_COLUMNS, r, strict=True)) for r in found), key=lambda r: (-r["requests"], r["path"], r["method"])
    )
    out = []
    for row in rows:
        row = _public(row)
        errors = row["status_4xx"] + row["status_5xx"]
        row["errors"] = errors
        row["error_rate"] = round(errors / row["requests"], 6) if row["requests"] else 0.0
        out.append(row)
    return out
