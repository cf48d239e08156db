"""`edgepipe replay verify`: the hourly aggregates recomputed from the archive (plus the
hot rows) and compared with the stored ones, one hour at a time, streaming; a large range
is split between two processes. Retention is named, not failed on: expired hours (their
objects deleted by the `expire` job) are skipped and listed, and hours whose hourly rows
were pruned are compared day by day with the daily rows. See `archiver.replay` for how
objects are found and trusted.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from itertools import compress, groupby, repeat
from operator import itemgetter, ne
from typing import Any

import sqlalchemy as sa

from archiver.replay import (
    DAY_S,
    FETCH,
    FOLD_DECODER,
    HOT_FOLD_COLUMNS,
    Progress,
    aggregate_rows,
    expired_hours,
    hour_range,
    objects_in,
    reading,
)
from pipeline import clock, log, meta, procs
from pipeline.aggregate import AGG_COLUMNS, AGG_KEYS, Acc, fold
from pipeline.bindings.archive import ObjectStore
from pipeline.bindings.db import Database
from pipeline.errors import ConfigError, IntegrityError
from pipeline.schema import ArchiveState, path_stats_daily, path_stats_hourly, traffic_events

# `verify` splits a range holding this many bytes of objects (~650,000 rows) between two
# processes; starting the helper costs ~0.5 s, which a smaller range would not win back.
SPLIT_BYTES = 32 * 2**20


def _by_hour(items: Iterable[Any], hour_of: Callable[[Any], int]) -> Iterator[tuple[int, list[Any]]]:
    """(hour, items) groups of items that come in hour order."""
    for hour, group in groupby(items, key=hour_of):
        yield hour, list(group)


def _walk(*streams: Iterator[tuple[int, list[Any]]]) -> Iterator[tuple[int, list[list[Any]]]]:
    """Walk `_by_hour` streams together: (hour, the items of each stream, [] where none)."""
    heads = [next(s, None) for s in streams]
    while live := [h[0] for h in heads if h is not None]:
        hour = min(live)
        items: list[list[Any]] = []
        for i, head in enumerate(heads):
            if head is not None and head[0] == hour:
                items.append(head[1])
                heads[i] = next(streams[i], None)
            else:
                items.append([])
        yield hour, items


def _differs(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return abs(float(got) - float(want)) > 1e-6 * max(1.0, abs(float(want)))
    return bool(got != want)


_KEY, _VALUES = itemgetter(slice(4)), itemgetter(slice(4, None))


def compare(acc: Acc, stored: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Differences between recomputed aggregates (`acc`) and stored `path_stats_hourly`
    rows (tuples of `AGG_KEYS` then `AGG_COLUMNS`). Integer columns and the min/max must
    match exactly, the response-time sum within float rounding (sums added in another
    order differ in the last bits). Equal rows, the rule, are told apart in one pass of
    row comparisons whose temporaries are freed as it goes; only the others are compared
    column by column."""
    differ = list(
        compress(stored, map(ne, map(acc.get, map(_KEY, stored), repeat(())), map(list, map(_VALUES, stored))))
    )
    out: list[dict[str, Any]] = []
    missing = 0
    for row in differ:
        got = acc.get(row[:4])
        where = dict(zip(AGG_KEYS, row[:4], strict=True))
        if got is None:
            missing += 1
            out.append(where | {"column": "row", "archive": False, "database": True})
            continue
        for name, value, expected in zip(AGG_COLUMNS, got, row[4:], strict=True):
            if value != expected and (name != "rt_sum_ms" or _differs(value, expected)):
                out.append(where | {"column": name, "archive": value, "database": expected})
    if len(acc) != len(stored) - missing:  # rows only in the archive
        keys = set(map(_KEY, stored))
        out += [
            dict(zip(AGG_KEYS, key, strict=True)) | {"column": "row", "archive": True, "database": False}
            for key in acc
            if key not in keys
        ]
    return out


_HOT = (  # archived and restored rows are in the bucket
    sa.select(*HOT_FOLD_COLUMNS)
    .where(
        traffic_events.c.ts >= sa.bindparam("lo"),
        traffic_events.c.ts < sa.bindparam("hi"),
        traffic_events.c.archive_state == ArchiveState.HOT,
    )
    .order_by(traffic_events.c.ts)
)
_STORED = (
    sa.select(*(path_stats_hourly.c[k] for k in AGG_KEYS), *(path_stats_hourly.c[c] for c in AGG_COLUMNS))
    .where(path_stats_hourly.c.hour >= sa.bindparam("lo"), path_stats_hourly.c.hour < sa.bindparam("hi"))
    .order_by(*(path_stats_hourly.c[k] for k in AGG_KEYS))
)


_STORED_DAILY = (
    sa.select(
        path_stats_daily.c.day,
        *(path_stats_daily.c[k] for k in AGG_KEYS[1:]),
        *(path_stats_daily.c[c] for c in AGG_COLUMNS),
    )
    .where(path_stats_daily.c.day >= sa.bindparam("lo"), path_stats_daily.c.day < sa.bindparam("hi"))
    .order_by(path_stats_daily.c.day, *(path_stats_daily.c[k] for k in AGG_KEYS[1:]))
)
_MIN, _MAX = AGG_COLUMNS.index("rt_min_ms"), AGG_COLUMNS.index("rt_max_ms")


class _PrunedDays:
    """`_verify` for the hours before the pruning watermark (`before`), whose hourly rows
    live on in daily rows only: their recomputed aggregates are summed per day and compared
    with the daily rows, for the days the range [h0, h1) covers whole and whose every hour
    is sound and unexpired. The other hours of pruned days (the range cuts their day, or an
    hour of their day is expired or has a bad object) go to `pruned_hours`, unverified."""

    def __init__(self, h0: int, h1: int, before: int, expired: set[int]) -> None:
        self.before, self.expired = before, expired
        self.first, self.end = -(-h0 // DAY_S) * DAY_S, min(before, h1 // DAY_S * DAY_S)  # the whole days
        self.mismatches: list[dict[str, Any]] = []
        self.pruned_hours: list[int] = []
        self._day: int | None = None
        self._acc: Acc = {}
        self._stored: list[tuple[Any, ...]] = []
        self._hours: list[int] = []
        self._whole = True

    def add(self, hour: int, acc: Acc, sound: bool, stored: list[tuple[Any, ...]]) -> None:
        """One hour's recomputed aggregates, and the daily rows that come with its day."""
        day = hour - hour % DAY_S
        if day != self._day:
            self.finish()
            self._day, self._acc, self._stored, self._hours = day, {}, [], []
            self._whole = self.first <= day < self.end
        self._stored += stored
        if not sound or hour in self.expired:
            self._whole = False
            return
        self._hours.append(hour)
        for (_hour, host, path, method), values in acc.items():
            into = self._acc.setdefault((day, host, path, method), [])
            if not into:
                into += values
                continue
            for i, v in enumerate(values):
                into[i] = min(into[i], v) if i == _MIN else max(into[i], v) if i == _MAX else into[i] + v

    def finish(self) -> None:
        """Compare (or set aside) the day in hand."""
        if self._day is not None and self._whole:
            self.mismatches += [m | {"daily": True} for m in compare(self._acc, self._stored)]
        elif self._day is not None:
            self.pruned_hours += self._hours
        self._day = None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile. Verify creates no reference cycles, but
    holds an hour's accumulators and fetched rows at a time: a million rows made the
    collector walk them again and again, ~15% of the run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _hot_hour(row: Sequence[Any]) -> int:
    return clock.hour_of_ms(int(row[0]))


def verify(
    db: Database, store: ObjectStore, prefix: str, start_s: float, end_s: float, progress: Progress | None = None,
    config: Any = None, split_bytes: int = SPLIT_BYTES,
) -> dict[str, Any]:  # fmt: skip
    """Recompute the hourly aggregates of [start, end) from the archive plus the hot rows
    and compare them with `path_stats_hourly` (see `_verify`). Hours are independent: given
    the bindings' `config` and at least `split_bytes` of objects in the range, the range is
    cut at the hour that halves the objects' bytes and a helper process (bindings of its
    own, from `config`) verifies the later part meanwhile; `processes` in the result says
    how many did. A helper that fails leaves its part to this process."""
    h0, h1 = hour_range(start_s, end_s)
    listing = objects_in(store, prefix, start_s, end_s)
    cut = None
    if config is not None and sum(size for _key, _hour, size in listing) >= split_bytes:
        cut = _halving_hour(listing)
    if cut is not None and cut < _pruned_before(db):  # pruned days are verified whole: cut between two
        cut = -(-cut // DAY_S) * DAY_S
        cut = cut if cut < h1 else None
    if cut is None:
        return _verify(db, store, listing, h0, h1, progress) | {"processes": 1}
    first, second = [o for o in listing if o[1] < cut], [o for o in listing if o[1] >= cut]
    total = len(listing)

    def report(done: int, _total: int = 0) -> None:  # objects read by both processes
        if progress is not None:
            progress(done + helper.done.value, total)

    with _VerifyHelper(config, second, cut, h1) as helper:
        mine = _verify(db, store, first, h0, cut, report)
        theirs = helper.result(lambda: report(len(first)))
    if theirs is not None:
        return _merged(mine, theirs) | {"processes": 2}
    helper.done.value = 0  # its part is read again, here
    theirs = _verify(db, store, second, cut, h1, lambda n, _t: report(len(first) + n))
    return _merged(mine, theirs) | {"processes": 1}


def _pruned_before(db: Database) -> int:
    with db.read() as conn:
        return meta.get_int(conn, meta.HOURLY_PRUNED_BEFORE)


def _halving_hour(listing: list[tuple[str, int, int]]) -> int | None:
    """The first hour of the later part, where the objects' bytes reach half (None when
    every object is of one hour)."""
    total, acc = sum(size for _k, _h, size in listing), 0
    for _key, hour, size in listing:
        if acc >= total / 2 and hour > listing[0][1]:
            return hour
        acc += size
    return None


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two `_verify` results of consecutive hour ranges as one."""
    return {"ok": a["ok"] and b["ok"]} | {k: a[k] + b[k] for k in a if k != "ok"}


class _VerifyHelper:
    """A spawned process running `_verify` on bindings opened from `config`. `done` counts
    the objects it has read; `result()` waits for its result, None if it failed."""

    def __init__(self, config: Any, listing: list[tuple[str, int, int]], h0: int, h1: int) -> None:
        self.done = procs.CONTEXT.Value("q", 0, lock=False)
        self._proc, self._receive = procs.start(
            _verify_part, config, listing, h0, h1, self.done, name="edgepipe-replay-verify"
        )

    def __enter__(self) -> _VerifyHelper:
        return self

    def result(self, tick: Callable[[], None]) -> dict[str, Any] | None:
        """Wait for the result, calling `tick` every 0.2 s meanwhile."""
        while not self._receive.poll(0.2):
            tick()
        tick()
        try:
            ok, value = self._receive.recv()
        except EOFError:
            ok, value = False, f"the helper process ended with exit code {self._proc.exitcode}"
        if not ok:
            log.event("replay_verify_helper_failed", logging.WARNING, error=value)
            return None
        return value

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        procs.end(self._proc, self._receive, wait=exc_type is None)  # interrupted: stop it now


def _verify_part(config: Any, listing: list[tuple[str, int, int]], h0: int, h1: int, done: Any, send: Any) -> None:
    """The helper process of `verify`: sends (True, the `_verify` result) or (False, the
    error)."""
    from pipeline.env import open_env

    try:
        env = open_env(config, check_schema=False)
        try:
            if env.ARCHIVE is None:
                raise ConfigError("config error: bindings.archive: no archive binding to verify from")
            result = _verify(env.DB, env.ARCHIVE, listing, h0, h1, lambda n, _t: setattr(done, "value", n))
        finally:
            env.close()
        send.send((True, result))
    except Exception as exc:
        send.send((False, f"{type(exc).__name__}: {exc}"))


def _verify(
    db: Database, store: ObjectStore, listing: list[tuple[str, int, int]], h0: int, h1: int,
    progress: Progress | None,
) -> dict[str, Any]:  # fmt: skip
    """Verify hours [h0, h1) whose objects are `listing`, one hour at a time: the objects
    (in key order), the hot rows (by ts) and the stored aggregates (by hour) are streamed
    side by side, so memory holds one hour's aggregates (and the next objects' text,
    fetched ahead by `read_objects`). Hours with a bad object are skipped, so are expired
    hours (`expired_hours`: their objects were deleted by retention); hours whose hourly
    rows were pruned are compared day by day with the daily rows (`_PrunedDays`)."""
    bad: list[dict[str, str]] = []
    mismatches: list[dict[str, Any]] = []
    unverified: list[int] = []
    objects = rows = hot = 0
    expired = expired_hours(db, h0, h1)
    days = _PrunedDays(h0, h1, _pruned_before(db), set(expired))
    archive = _by_hour(listing, itemgetter(1))
    bodies = reading(store, [key for key, _hour, _size in listing], FOLD_DECODER, progress)
    with _collector_paused(), closing(bodies), db.read() as conn:
        hot_rows = _by_hour(db.stream(conn, _HOT, ("lo", "hi"), (h0 * 1000, h1 * 1000), FETCH), _hot_hour)
        stored = _by_hour(db.stream(conn, _STORED, ("lo", "hi"), (h0, h1), FETCH), itemgetter(0))
        daily = _by_hour(db.stream(conn, _STORED_DAILY, ("lo", "hi"), (days.first, days.end), FETCH), itemgetter(0))
        for hour, (found, hot_part, stored_part, daily_part) in _walk(archive, hot_rows, stored, daily):
            acc: Acc = {}
            sound = True
            for _found in found:  # `bodies` yields the listing's objects in its order
                key, obj_rows = next(bodies)
                if isinstance(obj_rows, IntegrityError):
                    bad.append({"key": key, "error": str(obj_rows)})
                    sound = False
                    continue
                aggregate_rows(obj_rows, acc)
                objects += 1
                rows += len(obj_rows)
            fold(acc, hot_part)
            hot += len(hot_part)
            if not sound:
                unverified.append(hour)
            if hour < days.before:
                days.add(hour, acc, sound, daily_part)
            elif sound and hour not in days.expired:
                mismatches += compare(acc, stored_part)
    days.finish()
    mismatches += days.mismatches
    return {
        "ok": not bad and not mismatches,
        "objects": objects,
        "archived_rows": rows,
        "hot_rows": hot,
        "bad": bad,
        "unverified_hours": unverified,
        "mismatches": mismatches,
        "expired_hours": expired,
        "pruned_hours": days.pruned_hours,
    }
