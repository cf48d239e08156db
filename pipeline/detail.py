"""Drill-down into the hot detail rows: `edgepipe events` and `GET /v1/events`.

A page is up to `limit` rows of `traffic_events` in the window [since, until), newest
first (ORDER BY ts DESC, id DESC), matching every filter given (path, method, status,
host), below the cursor (the (ts, id) of the previous page's last row).

Served by the UNIQUE index on (ts, id), never by a scan of the table, and with no index of
its own: every index on `traffic_events` slows the consumer's inserts, the product's hot
path. How:

* Every statement reads a range of that index, walked backwards. Without `since` the range
  starts at 2000-01-01, the earliest `ts` an event may carry (`pipeline.events.MIN_TS_MS`):
  the whole table, but as a range, walked from its newest end and left after the rows
  wanted.
* Without a filter a range is one statement: `WHERE ts >= lo AND ts < hi AND (ts, id) <
  cursor ORDER BY ts DESC, id DESC LIMIT n`.
* With filters a range is walked in steps of at most `STEP` index entries. One statement
  finds the key `STEP` entries further down (it reads the index alone); a second reads the
  rows between that key and the previous one, newest first, applies the filters and stops
  at the rows still wanted. One statement with the filters and a LIMIT is what SQLite
  serves from the index, but PostgreSQL's planner, when it believes the filters rare,
  reads the whole table and sorts the matches instead; a step bounded by keys leaves it
  only that step's part of the index to read (in index order, or through a bitmap of it).
  Finding the key first and reading up to it — rather than reading `STEP` rows and asking
  where they ended — keeps the steps exact while the consumer inserts: no row is read by
  two steps, none between two steps is skipped.
* `path` also narrows the walk through the hourly aggregates (`path_stats_hourly`,
  clustered by (hour, host, path, method)): only the hours in which that path — normalised
  as the consumer normalises it — has rows are walked, as ts ranges (consecutive hours
  merged). An hour whose path budget was spent counts its later new paths as `__other__`,
  so the hours of `__other__` are walked too (their detail rows keep their own path; the
  filter on `path` picks them out). The hours are read `HOURS_PER_READ` at a time, newest
  first, from the start of the hot table (`min(ts)`, one index lookup) or `since`. Days
  whose hourly rows were pruned into `path_stats_daily` (`[retention] hourly_days`; only
  rows archived but not cleaned yet, or restored from the archive, can be that old) are
  narrowed by their daily rows, a day at a time.

Rows restored from the archive (`edgepipe replay restore`) are detail rows too: listed like
the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from pipeline import meta
from pipeline.bindings.db import Database
from pipeline.errors import ValidationError
from pipeline.events import MAX_ID_LEN, MIN_TS_MS
from pipeline.paths import PathNormalizer
from pipeline.schema import OTHER_PATH, path_stats_daily, path_stats_hourly, traffic_events

STEP = 1000  # index entries walked per statement when rows are filtered
HOURS_PER_READ = 24  # hours of `path_stats_hourly` fetched per read when narrowing by path
MAX_TS_MS = 2**63 - 1

_te = traffic_events
COLUMNS = (
    _te.c.ts, _te.c.id, _te.c.method, _te.c.path, _te.c.status, _te.c.response_time_ms,
    _te.c.host, _te.c.colo, _te.c.bytes, _te.c.overflow,
)  # fmt: skip
_STATUS_CLASS = re.compile(r"([1-5])xx", re.IGNORECASE)
_METHOD = re.compile(r"[A-Za-z]{1,16}")

Key = tuple[int, str]  # (ts, id): where a row sits in the walk


@dataclass(frozen=True)
class Filters:
    """What a page selects. Times in epoch ms (`until` exclusive); `path` normalised;
    `method` upper-case; `host` lower-case; `status` an inclusive (low, high) range."""

    since_ms: int | None = None
    until_ms: int | None = None
    path: str | None = None
    method: str | None = None
    status: tuple[int, int] | None = None
    host: str | None = None

    @property
    def filters_rows(self) -> bool:
        return any(v is not None for v in (self.path, self.method, self.status, self.host))


def parse_status(value: str, name: str = "status") -> tuple[int, int]:
    """An exact code (`404`, 100-599) or a class (`5xx`, 1xx-5xx) as a (low, high) range."""
    text = value.strip()
    if m := _STATUS_CLASS.fullmatch(text):
        low = int(m.group(1)) * 100
        return low, low + 99
    if text.isascii() and text.isdigit() and 100 <= int(text) <= 599:
        return int(text), int(text)
    raise ValidationError(name, f"{value!r} is neither a status code (100-599) nor a class (1xx-5xx)")


def filters(
    normalizer: PathNormalizer,
    since: float | None = None,
    until: float | None = None,
    path: str | None = None,
    method: str | None = None,
    status: str | None = None,
    host: str | None = None,
    prefix: str = "",
) -> Filters:
    """Validated `Filters` from a caller's values: times in epoch seconds (parsed by the
    caller, as its other commands or endpoints parse them), the rest as given. An invalid
    value raises a ValidationError naming `prefix` + the parameter (`--status`, `status`)."""
    since_ms = None if since is None else _ms(since, prefix + "since")
    until_ms = None if until is None else _ms(until, prefix + "until")
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise ValidationError(prefix + "until", f"must be after {prefix}since")
    for name, text in (("path", path), ("method", method), ("host", host)):
        if text is not None and ("\x00" in text or _unencodable(text)):  # what no row can hold
            raise ValidationError(prefix + name, "holds a NUL or a lone surrogate")
    if path is not None:
        if not path.startswith("/"):
            raise ValidationError(prefix + "path", "must start with /")
        path = normalizer.normalize(path)
    if method is not None:
        if not _METHOD.fullmatch(method):
            raise ValidationError(prefix + "method", f"{method!r} is not an HTTP method")
        method = method.upper()
    if host is not None:
        if len(host) > 255:
            raise ValidationError(prefix + "host", "longer than 255 characters")
        host = host.lower()
    status_range = None if status is None else parse_status(status, prefix + "status")
    return Filters(since_ms, until_ms, path, method, status_range, host)


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _ms(seconds: float, name: str) -> int:
    if not math.isfinite(seconds) or not 0 <= round(seconds * 1000) <= MAX_TS_MS:
        raise ValidationError(name, "out of range")
    return round(seconds * 1000)


def check_cursor(key: tuple[Any, ...], name: str = "cursor") -> Key:
    """A decoded cursor's (ts, id), checked so that it can be bound to a statement."""
    ts, event_id = key
    if type(ts) is not int or not 0 <= ts <= MAX_TS_MS:
        raise ValidationError(name, "not a cursor returned by this endpoint")
    if type(event_id) is not str or len(event_id) > MAX_ID_LEN or "\x00" in event_id:
        raise ValidationError(name, "not a cursor returned by this endpoint")
    return ts, event_id


def iso_ms(ts_ms: int) -> str:
    """RFC 3339 UTC with milliseconds: `2026-11-19T12:00:00.123Z`."""
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC).replace(microsecond=ts_ms % 1000 * 1000)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _public(r: Any) -> dict[str, Any]:
    ts, event_id, method, path, status, rt, host, colo, nbytes, overflow = r
    return {
        "ts": iso_ms(ts), "id": event_id, "method": method, "path": path, "status": status,
        "response_time_ms": float(rt), "host": host, "colo": colo, "bytes": nbytes, "overflow": bool(overflow),
    }  # fmt: skip


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next: Key | None  # the (ts, id) to pass back as the cursor; None on the last page


def page(
    db: Database,
    f: Filters,
    limit: int,
    after: Key | None = None,
    step: int = STEP,
    periods_per_read: int = HOURS_PER_READ,
) -> Page:
    """Up to `limit` matching rows below `after`, newest first, and the key of the last one
    when more rows match (one row more is looked for, to know). `step` and
    `periods_per_read` size the walk (see the module's documentation), not the result."""
    if step < 1 or periods_per_read < 1:
        raise ValueError("step and periods_per_read must be positive")
    found: list[Any] = []
    with db.read() as conn:
        if not db.in_transaction():
            db.plan_as_small(conn)
        walk = _Walk(conn, f, step, periods_per_read)
        for lo, hi in walk.ranges(after):
            walk.rows(lo, hi, after, limit + 1, found)
            if len(found) > limit:
                break
    rows = [_public(r) for r in found[:limit]]
    nxt = (found[limit - 1][0], found[limit - 1][1]) if len(found) > limit else None
    return Page(rows, nxt)


# --- statements --------------------------------------------------------------------------

_NEWEST_FIRST = (_te.c.ts.desc(), _te.c.id.desc())


def _key_range(lo: int, hi: int | None, below: Key | None, floor: Key | None) -> list[Any]:
    """Index-range conditions: lo <= ts < hi, (ts, id) < below, (ts, id) >= floor. The
    plain `ts` bounds beside the row comparisons give every planner its range."""
    cond: list[Any] = [_te.c.ts >= lo]
    if hi is not None:
        cond.append(_te.c.ts < hi)
    if below is not None:
        cond += [_te.c.ts <= below[0], sa.tuple_(_te.c.ts, _te.c.id) < sa.tuple_(*below)]
    if floor is not None:
        cond += [_te.c.ts >= floor[0], sa.tuple_(_te.c.ts, _te.c.id) >= sa.tuple_(*floor)]
    return cond


def _row_filters(f: Filters) -> list[Any]:
    cond: list[Any] = []
    if f.path is not None:
        cond.append(_te.c.path == f.path)
    if f.method is not None:
        cond.append(_te.c.method == f.method)
    if f.status is not None:
        low, high = f.status
        cond.append(_te.c.status == low if low == high else _te.c.status.between(low, high))
    if f.host is not None:
        cond.append(_te.c.host == f.host)
    return cond


def rows_statement(f: Filters, lo: int, hi: int | None, below: Key | None, floor: Key | None, n: int) -> Any:
    """The matching rows of an index range, newest first, at most `n`."""
    cond = _key_range(lo, hi, below, floor) + _row_filters(f)
    return sa.select(*COLUMNS).where(*cond).order_by(*_NEWEST_FIRST).limit(n)


def step_statement(lo: int, hi: int | None, below: Key | None, step: int) -> Any:
    """The key `step` index entries down from `below` in the range (none: fewer are left).
    Reads the index alone."""
    stmt = sa.select(_te.c.ts, _te.c.id).where(*_key_range(lo, hi, below, None)).order_by(*_NEWEST_FIRST)
    return stmt.limit(1).offset(step - 1)


def periods_statement(table: sa.Table, column: str, f: Filters, first: int, top: int | None, n: int) -> Any:
    """Up to `n` distinct periods (hours or days) in [first, top), newest first, whose
    aggregate rows hold the path or `__other__` (and the method and host, if given). A
    range of the table's primary key, whose leading column is the period."""
    period = table.c[column]
    cond = [period >= first, table.c.path.in_([f.path, OTHER_PATH])]
    if top is not None:
        cond.append(period < top)
    if f.method is not None:
        cond.append(table.c.method == f.method)
    if f.host is not None:
        cond.append(table.c.host == f.host)
    return sa.select(period).where(*cond).distinct().order_by(period.desc()).limit(n)


# --- the walk ----------------------------------------------------------------------------


@dataclass
class _Walk:
    conn: sa.Connection
    f: Filters
    step: int
    periods_per_read: int

    def rows(self, lo: int, hi: int | None, below: Key | None, want: int, found: list[Any]) -> None:
        """Append to `found` the matching rows of [lo, hi) below `below`, newest first,
        until it holds `want` rows or the range is walked."""
        f, execute = self.f, self.conn.execute
        if not f.filters_rows:
            found += execute(rows_statement(f, lo, hi, below, None, want - len(found))).all()
            return
        while len(found) < want:
            row = execute(step_statement(lo, hi, below, self.step)).first()
            floor: Key | None = None if row is None else (row[0], row[1])
            found += execute(rows_statement(f, lo, hi, below, floor, want - len(found))).all()
            if floor is None:
                return
            below = floor

    def ranges(self, after: Key | None) -> Iterator[tuple[int, int | None]]:
        """The [lo, hi) ts ranges to walk, newest first (hi None: no upper bound)."""
        f = self.f
        lo = MIN_TS_MS if f.since_ms is None else max(f.since_ms, MIN_TS_MS)
        hi = f.until_ms
        if after is not None:
            hi = after[0] + 1 if hi is None else min(hi, after[0] + 1)
        if hi is not None and hi <= lo:
            return
        if f.path is None:
            yield lo, hi
            return
        oldest = self.conn.execute(sa.select(sa.func.min(_te.c.ts))).scalar()
        if oldest is None:
            return
        lo = max(lo, int(oldest))
        if hi is not None and hi <= lo:
            return
        for start_s, end_s in self._periods(lo, hi):
            r_lo, r_hi = max(lo, start_s * 1000), end_s * 1000 if hi is None else min(hi, end_s * 1000)
            if r_lo < r_hi:
                yield r_lo, r_hi

    def _periods(self, lo: int, hi: int | None) -> Iterator[tuple[int, int]]:
        """[start, end) in epoch seconds, newest first: runs of consecutive hours (then of
        days, before the hourly rows' pruning watermark) whose aggregates hold the path (or
        `__other__`) and reach into [lo, hi) (epoch ms)."""
        pruned_before = meta.get_int(self.conn, meta.HOURLY_PRUNED_BEFORE)
        lo_s = lo // 1000
        top = None if hi is None else -(-hi // 1000)  # periods starting before hi
        first_hour = max(lo_s // 3600 * 3600, pruned_before)
        if top is None or top > first_hour:
            yield from self._runs(path_stats_hourly, "hour", 3600, first_hour, top)
        if lo_s < pruned_before:
            top = pruned_before if top is None else min(top, pruned_before)
            yield from self._runs(path_stats_daily, "day", 86_400, lo_s // 86_400 * 86_400, top)

    def _runs(self, table: sa.Table, column: str, size: int, first: int, top: int | None) -> Iterator[tuple[int, int]]:
        run: tuple[int, int] | None = None
        n = self.periods_per_read
        while True:
            stmt = periods_statement(table, column, self.f, first, top, n)
            periods = [int(p) for p in self.conn.execute(stmt).scalars()]
            for p in periods:
                if run is not None and p + size == run[0]:
                    run = (p, run[1])
                    continue
                if run is not None:
                    yield run
                run = (p, p + size)
            if len(periods) < n:
                break
            top = periods[-1]
        if run is not None:
            yield run
