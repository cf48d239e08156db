"""The traffic consumer: the queue handler that turns events into hourly aggregates.

Per batch, in the one transaction the worker loop holds:
1. validate each message, which holds one event or a JSON array of events; an invalid
   event is dead-lettered with a reason naming the field (no retries for poison: the
   message, or the single array element) and its valid siblings go on;
2. insert the events with ON CONFLICT (ts, id) DO NOTHING, learning which rows this
   transaction actually inserted (after a batch of nothing but duplicates, as when a backlog
   is delivered again, the stored keys are counted first and an insert that would add
   nothing is skipped: `Database.insert_new`'s `likely_present`, and the queue is asked to
   take the batches to come ahead: `Queue.take_ahead`; after a batch of nothing but new
   events, PostgreSQL first tries to store them all at once: `likely_new`);
3. fold only those into hourly rows (`fold`) and add them to `path_stats_hourly` with
   additive upserts;
4. add the batch's data-quality counts (received, inserted, duplicates, invalid by field,
   too late, overflow) to `quality_hourly`, under the hour the batch was handled.
A redelivered, retried or re-ingested event is therefore never counted twice: its insert
returns nothing, so it contributes nothing to the aggregates.

The upserts of steps 3 and 4 read nothing back: they are left to the end of the
transaction (`Database.at_commit`), which a pipelined worker on PostgreSQL runs on the
committer thread while it takes the next batch. The paths of an hour that batch wrote are
known locally; they are read again from the database only after that commit
(`await_commit`), which may add to them. There the archive watermark (step 1's
"too late") is read at each commit for the next batch, and checked at the commit of the
batch it was used for: a valid event of the batch older than the watermark read there
makes the commit fail with `RedoBatch`, and the worker handles the batch again.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.aggregate import AGG_COLUMNS, AGG_KEYS, Acc, fold
from pipeline.bindings.db import Database
from pipeline.bindings.queue import REASON_INVALID, REASON_TOO_LATE, Message, MessageBatch
from pipeline.config import Config
from pipeline.env import Env
from pipeline.errors import RedoBatch, ValidationError
from pipeline.events import EVENT_COLUMNS, Event, decode_batch, decode_message, parse_event
from pipeline.paths import PathNormalizer
from pipeline.schema import (
    OTHER_PATH,
    path_stats_hourly,
    quality_hourly,
    traffic_events,
)

KNOWN_PATHS_HOURS = 48
QUALITY_KEYS = ("hour", "kind")
QUALITY_COLUMNS = ("hour", "kind", "count")
_CONTENT_TYPE, _TS = attrgetter("content_type"), attrgetter("ts")


def _mark_overflow() -> sa.Update:
    return (
        traffic_events.update()
        .where(traffic_events.c.ts == sa.bindparam("k_ts"), traffic_events.c.id == sa.bindparam("k_id"))
        .values(overflow=1)
    )


_PATHS_OF_HOUR = (
    sa.select(path_stats_hourly.c.path)
    .distinct()
    .where(path_stats_hourly.c.hour == sa.bindparam("hour"), path_stats_hourly.c.path != OTHER_PATH)
)


@dataclass
class BatchReport:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    too_late: int = 0
    overflow: int = 0  # inserted, but counted under __other__ (the hour's path budget was spent)
    invalid_by: dict[str, int] = field(default_factory=dict)  # invalid events by the field named

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if type(v) is int}

    def refuse(self, error: ValidationError) -> None:
        """Count one invalid event, by the field its error names."""
        self.invalid += 1
        self.invalid_by[error.field] = self.invalid_by.get(error.field, 0) + 1

    def quality_rows(self, hour: int) -> list[tuple[int, str, int]]:
        """`quality_hourly` rows (hour, kind, count) of this report's non-zero counts."""
        counts = {
            "received": self.received,
            "inserted": self.inserted,
            "duplicate": self.duplicates,
            "too_late": self.too_late,
            "overflow": self.overflow,
            **{f"invalid:{name}"[:80]: n for name, n in self.invalid_by.items()},
        }
        return [(hour, kind, n) for kind, n in sorted(counts.items()) if n]


def _dead_letter(msg: Message, index: int | None, reason: str, error: str) -> None:
    """Dead-letter the whole message (`index` None) or one element of its array."""
    if index is None:
        msg.dead_letter(reason, error)
    else:
        msg.dead_letter_part(index, reason, error)


class TrafficConsumer:
    """Build once per process; `handle_batch(batch, env, ctx)` is the queue handler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.normalizer = PathNormalizer(config.paths)
        self.max_paths = config.paths.max_paths_per_hour
        # hour -> distinct paths admitted in that hour (see _overflow).
        self._known: OrderedDict[int, set[str]] = OrderedDict()  # least recently used first
        self._redelivering = False  # the last batch stored was all duplicates
        self._keeping_up = False  # the last batch stored was all new
        # The archive watermark as the last commit in the background read it (None: not yet).
        self._watermark: int | None = None

    def handle_batch(self, batch: MessageBatch, env: Env, ctx: Any = None) -> BatchReport:
        report = BatchReport(received=len(batch))
        now_ms = clock.now_ms()
        with env.DB.transaction() as conn:
            background = env.DB.commits_in_background()
            cached = self._watermark if background else None
            watermark = meta.archive_watermark_ms(env.DB, conn) if cached is None else cached
            events = self._validate(batch, now_ms, watermark, report)
            if background:
                env.DB.at_commit(partial(self._check_watermark, env.DB, min(map(_TS, events), default=None)))
            if events:
                report.inserted = self._store(env, conn, events, report)
                report.duplicates += len(events) - report.inserted
            quality = report.quality_rows(now_ms // 3_600_000 * 3600)
            env.DB.at_commit(
                lambda c: env.DB.upsert_add_rows(c, quality_hourly, QUALITY_COLUMNS, quality, QUALITY_KEYS)
            )
        # Returning acks every message not dead-lettered (as a Queues handler's return
        # does); a failure above retries the whole batch.
        return report

    def _check_watermark(self, db: Database, least: int | None, conn: sa.Connection) -> None:
        """At a background commit: read the archive watermark for the next batch, and check
        this one against it: RedoBatch (nothing of it stands; the worker handles it again)
        when one of its valid events, `least` the oldest, is older than it."""
        self._watermark = meta.archive_watermark_ms(db, conn)
        if least is not None and least < self._watermark:
            raise RedoBatch("the archive watermark moved past events of the batch: handle it again")

    def _validate(self, batch: MessageBatch, now_ms: int, watermark: int, report: BatchReport) -> list[Event]:
        """Valid, batch-unique events; dead-letter the rest with their reasons (a whole
        message, or single elements of a message that holds an array of events). A batch
        with nothing to refuse is checked in bulk (`decode_batch`); any other goes message
        by message."""
        if set(map(_CONTENT_TYPE, batch.messages)) == {"json"}:
            events = decode_batch([msg.raw for msg in batch], self.normalizer, now_ms, watermark)
            if events is not None:
                report.received += len(events) - len(batch)
                return events
        events = []
        seen: set[tuple[int, str]] = set()
        for msg in batch:
            try:
                if msg.content_type == "json":
                    got = decode_message(msg.raw, self.normalizer, now_ms, fallback_id=msg.id)
                else:
                    got = parse_event(msg.body, self.normalizer, now_ms, fallback_id=msg.id)
            except ValidationError as exc:
                msg.dead_letter(REASON_INVALID, str(exc))
                report.refuse(exc)
                continue
            items: Iterable[tuple[int | None, Event | ValidationError]]
            if isinstance(got, Event):
                items = ((None, got),)
            else:
                report.received += len(got) - 1
                items = enumerate(got)
            for index, ev in items:
                if isinstance(ev, ValidationError):
                    report.refuse(ev)
                    _dead_letter(msg, index, REASON_INVALID, str(ev))
                    continue
                if ev.ts < watermark:
                    report.too_late += 1
                    _dead_letter(
                        msg,
                        index,
                        REASON_TOO_LATE,
                        (
                            f"ts: {clock.iso(ev.ts / 1000)} is older than the archive watermark "
                            f"{clock.iso(watermark / 1000)}; its duplicates can no longer be detected"
                        ),
                    )
                    continue
                key = (ev.ts, ev.id)
                if key in seen:
                    report.duplicates += 1
                    continue
                seen.add(key)
                events.append(ev)
        return events

    def _store(self, env: Env, conn: sa.Connection, events: list[Event], report: BatchReport) -> int:
        """Insert the events; add exactly the rows this call inserted to the aggregates.

        Only inserted events spend an hour's path budget, so the budget is settled after
        the insert: the few events past it (none below `max_paths_per_hour`) get their
        `overflow` flag set by an UPDATE in the same transaction. A batch of duplicates
        costs the insert and nothing else."""
        rows = [
            (ev.ts, ev.id, ev.method, ev.path, 0, ev.status, ev.response_time_ms, ev.host, ev.colo, ev.bytes)
            for ev in events
        ]  # Event.values(), inlined: this runs for every event
        new = env.DB.insert_new(
            conn, traffic_events, EVENT_COLUMNS, rows, ("ts", "id"),
            likely_present=self._redelivering, likely_new=self._keeping_up,
        )  # fmt: skip
        self._redelivering = not new  # a batch of duplicates: the next one probably is too
        env.QUEUE.take_ahead(self._redelivering)  # and costs the database little beside its take
        self._keeping_up = len(new) == len(rows)  # a batch all new: so is the next one, probably
        if not new:
            return 0
        inserted = events if len(new) == len(events) else [events[i] for i in new]
        overflow = self._overflow(env.DB, conn, inserted)
        if overflow:
            report.overflow = len(overflow)
            mark = env.DB.cached(("mark_overflow",), _mark_overflow)
            env.DB.executemany(conn, mark, ("k_ts", "k_id"), list(overflow))
        acc: Acc = {}
        fold(acc, (
            (ev.ts, ev.host, OTHER_PATH if overflow and (ev.ts, ev.id) in overflow else ev.path, ev.method, ev.status,
             ev.bytes, ev.response_time_ms)
            for ev in inserted
        ))  # fmt: skip
        hourly = [(*key, *a) for key, a in acc.items()]
        env.DB.at_commit(lambda c: env.DB.upsert_add_rows(
            c, path_stats_hourly, AGG_KEYS + AGG_COLUMNS, hourly, AGG_KEYS,
            minimum=["rt_min_ms"], maximum=["rt_max_ms"],
        ))  # fmt: skip
        return len(new)

    def _overflow(self, db: Database, conn: sa.Connection, events: list[Event]) -> set[tuple[int, str]]:
        """Keys of events whose (hour, path) is beyond the hour's distinct-path budget.

        The distinct paths of an hour are read from the database once per process and then
        tracked locally, and re-read whenever the local view says the budget is spent, so a
        single consumer is exact without a query per batch. The hours of the last batch
        stay known (so a first read never misses what its commit in flight adds); a
        re-read waits for that commit (`await_commit`). Concurrent consumers on
        PostgreSQL may each admit a few paths past the cap before they see each other's."""
        by_hour: dict[int, set[str]] = defaultdict(set)
        for ev in events:
            by_hour[ev.ts // 3_600_000 * 3600].add(ev.path)  # clock.hour_of_ms, inlined
        over: set[tuple[int, str]] = set()
        for hour, paths in by_hour.items():
            known = self._known.get(hour)
            if known is not None:
                self._known.move_to_end(hour)
            else:  # not an hour of the batch whose commit may be in flight: those are all known
                known = self._known[hour] = self._paths_of_hour(db, conn, hour)
            new_paths = paths - known
            if not new_paths:
                continue
            if len(known) + len(new_paths) > self.max_paths:
                # Refresh before refusing anything, once the commit in flight (which may add
                # paths to the hour) is done. Replace, not merge: paths admitted by a batch
                # that rolled back were never stored and must not spend the budget.
                db.await_commit()
                known = self._known[hour] = self._paths_of_hour(db, conn, hour)
                new_paths = paths - known
            budget = self.max_paths - len(known)
            if len(new_paths) <= budget:
                known |= new_paths
                continue
            for ev in events:  # admit new paths in arrival order until the budget is spent
                if clock.hour_of_ms(ev.ts) != hour or ev.path in known:
                    continue
                if budget > 0:
                    budget -= 1
                    known.add(ev.path)
                else:
                    over.add((ev.ts, ev.id))
        while len(self._known) > max(KNOWN_PATHS_HOURS, len(by_hour)):  # this batch's hours stay
            self._known.popitem(last=False)
        return over

    @staticmethod
    def _paths_of_hour(db: Database, conn: sa.Connection, hour: int) -> set[str]:
        return {path for (path,) in db.fetchall(conn, _PATHS_OF_HOUR, ("hour",), (hour,))}
