"""The traffic consumer: the queue handler that turns events into hourly aggregates.

Per batch, in the one transaction the worker loop holds:
1. validate each message; an invalid one is dead-lettered with a reason naming the field
   (no retries for poison) and its valid siblings go on;
2. insert the events with ON CONFLICT (ts, id) DO NOTHING … RETURNING, learning which rows
   this transaction actually inserted;
3. add only those to `path_stats_hourly` with additive upserts.
A redelivered, retried or re-ingested event is therefore never counted twice: its insert
returns nothing, so it contributes nothing to the aggregates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.bindings.queue import REASON_INVALID, REASON_TOO_LATE, MessageBatch
from pipeline.config import Config
from pipeline.errors import ValidationError
from pipeline.events import Event, parse_event
from pipeline.histogram import N_BUCKETS, bucket_index
from pipeline.paths import PathNormalizer
from pipeline.schema import (
    BUCKET_COLUMNS,
    OTHER_PATH,
    STATUS_COLUMNS,
    path_stats_hourly,
    traffic_events,
)

te = traffic_events
psh = path_stats_hourly
AGG_KEYS = ("hour", "host", "path", "method")
# Layout of an accumulator list: requests, 5 status classes, bytes, rt sum, min, max, buckets.
_STATUS0, _BYTES, _RTSUM, _RTMIN, _RTMAX, _B0 = 1, 6, 7, 8, 9, 10
AGG_COLUMNS = ("requests", *STATUS_COLUMNS, "bytes_sum", "rt_sum_ms", "rt_min_ms", "rt_max_ms", *BUCKET_COLUMNS)
KNOWN_PATHS_HOURS = 48


@dataclass
class BatchReport:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    too_late: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TrafficConsumer:
    """Build once per process; call `queue(batch, env, ctx)` per batch."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.normalizer = PathNormalizer(config.paths)
        self.max_paths = config.paths.max_paths_per_hour
        # Paths known to have an aggregate row in an hour. Aggregate rows are never
        # deleted, so this positive cache can only be incomplete, never wrong.
        self._known: dict[int, set[str]] = {}

    def queue(self, batch: MessageBatch, env: Any, ctx: Any = None) -> BatchReport:
        report = BatchReport(received=len(batch))
        now_ms = clock.now_ms()
        with env.DB.transaction() as conn:
            watermark = meta.archive_watermark_ms(conn)
            events = self._validate(batch, now_ms, watermark, report)
            if events:
                report.inserted = self._store(env, conn, events)
                report.duplicates += len(events) - report.inserted
        batch.ack_all()  # after the writes: a failure above retries the whole batch
        return report

    def _validate(self, batch: MessageBatch, now_ms: int, watermark: int, report: BatchReport) -> list[Event]:
        """Valid, batch-unique events; dead-letter the rest with their reasons."""
        events: list[Event] = []
        seen: set[tuple[int, str]] = set()
        for msg in batch:
            if msg.decision is not None:  # already dead-lettered by the queue (undecodable)
                report.invalid += 1
                continue
            try:
                ev = parse_event(msg.body, self.normalizer, now_ms, fallback_id=msg.id)
            except ValidationError as exc:
                msg.dead_letter(REASON_INVALID, str(exc))
                report.invalid += 1
                continue
            if ev.ts < watermark:
                msg.dead_letter(
                    REASON_TOO_LATE,
                    f"ts: {clock.iso(ev.ts / 1000)} is older than the archive watermark "
                    f"{clock.iso(watermark / 1000)}; its duplicates can no longer be detected",
                )
                report.too_late += 1
                continue
            if (ev.ts, ev.id) in seen:
                report.duplicates += 1
                continue
            seen.add((ev.ts, ev.id))
            events.append(ev)
        return events

    def _store(self, env: Any, conn: sa.Connection, events: list[Event]) -> int:
        overflow = self._overflow(conn, events)
        rows = [ev.row(int((ev.ts, ev.id) in overflow)) for ev in events]
        inserted = self._insert(env.DB, conn, rows)
        new = [ev for ev in events if (ev.ts, ev.id) in inserted]
        env.DB.upsert_add(conn, psh, aggregate(new, overflow), AGG_KEYS, minimum=["rt_min_ms"], maximum=["rt_max_ms"])
        return len(new)

    @staticmethod
    def _insert(db: Any, conn: sa.Connection, rows: list[dict[str, Any]]) -> set[tuple[int, str]]:
        stmt = db.insert(te).on_conflict_do_nothing(index_elements=["ts", "id"]).returning(te.c.ts, te.c.id)
        return {(r[0], r[1]) for r in conn.execute(stmt, rows)}

    def _overflow(self, conn: sa.Connection, events: list[Event]) -> set[tuple[int, str]]:
        """Keys of events whose (hour, path) is beyond the hour's distinct-path budget."""
        by_hour: dict[int, list[Event]] = defaultdict(list)
        for ev in events:
            by_hour[clock.hour_of_ms(ev.ts)].append(ev)
        over: set[tuple[int, str]] = set()
        for hour, evs in by_hour.items():
            known = self._known.setdefault(hour, set())
            unknown = {ev.path for ev in evs} - known
            if unknown:
                known |= self._existing_paths(conn, hour, unknown)
                unknown -= known
            if not unknown:
                continue
            used = conn.execute(
                sa.select(sa.func.count(sa.distinct(psh.c.path))).where(psh.c.hour == hour, psh.c.path != OTHER_PATH)
            ).scalar_one()
            budget = self.max_paths - used
            for ev in evs:  # admit new paths in arrival order until the budget is spent
                if ev.path in unknown:
                    if budget > 0:
                        budget -= 1
                        unknown.discard(ev.path)
                        known.add(ev.path)
                    else:
                        over.add((ev.ts, ev.id))
        if len(self._known) > KNOWN_PATHS_HOURS:
            for hour in sorted(self._known)[: len(self._known) - KNOWN_PATHS_HOURS]:
                del self._known[hour]
        return over

    @staticmethod
    def _existing_paths(conn: sa.Connection, hour: int, paths: set[str]) -> set[str]:
        stmt = (
            sa.select(psh.c.path)
            .distinct()
            .where(psh.c.hour == hour, psh.c.path.in_(sa.bindparam("paths", expanding=True)))
        )
        return {r[0] for r in conn.execute(stmt, {"paths": list(paths)})}


def aggregate(events: list[Event], overflow: set[tuple[int, str]] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """Fold events into one row per (hour, host, path, method), ready for upsert_add."""
    acc: dict[tuple[int, str, str, str], list[Any]] = {}
    for ev in events:
        path = OTHER_PATH if (ev.ts, ev.id) in overflow else ev.path
        key = (clock.hour_of_ms(ev.ts), ev.host, path, ev.method)
        a = acc.get(key)
        rt = ev.response_time_ms
        if a is None:
            a = acc[key] = [0, 0, 0, 0, 0, 0, 0, 0.0, rt, rt] + [0] * N_BUCKETS
        a[0] += 1
        a[_STATUS0 + ev.status // 100 - 1] += 1
        a[_BYTES] += ev.bytes or 0
        a[_RTSUM] += rt
        if rt < a[_RTMIN]:
            a[_RTMIN] = rt
        if rt > a[_RTMAX]:
            a[_RTMAX] = rt
        a[_B0 + bucket_index(rt)] += 1
    return [dict(zip(AGG_KEYS, key, strict=True)) | dict(zip(AGG_COLUMNS, a, strict=True)) for key, a in acc.items()]
