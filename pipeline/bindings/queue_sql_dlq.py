"""The dead-letter side of the SQL queue (`SqlQueue`): the `queue_dlq` table and the
lasting per-reason counts in `counters`, one row `dlq_total.<queue>.<reason>` each.

Letters are counted in the transaction that stores them (the consumer's, when the queue
settles inside it) with one additive upsert per settle — a row per reason, in name order,
so concurrent consumers lock the counters in the same order. A redrive takes its letters
out of the count in its own transaction; a purge leaves the count alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.bindings.queue import DeadReason, parse_reason
from pipeline.errors import ConfigError
from pipeline.schema import counters, queue_dlq

TOTAL_PREFIX = "dlq_total."  # + "<queue>.<reason>" (the 0002 migration backfills these)
TAKEN = (
    queue_dlq.c.seq,
    queue_dlq.c.message_id,
    queue_dlq.c.content_type,
    queue_dlq.c.body,
    queue_dlq.c.enqueued_at,
    queue_dlq.c.reason,
)


class SqlDeadLetters:
    """The dead letters of one named queue."""

    def __init__(self, db: Database, queue: str) -> None:
        self.db = db
        self.queue = queue
        self.prefix = f"{TOTAL_PREFIX}{queue}."
        longest = max(len(r.value) for r in DeadReason)
        if len(self.prefix) + longest > getattr(counters.c.name.type, "length", 64):
            raise ConfigError(f"queue name {queue!r} is too long for its dead-letter counters")

    def _where(self, reason: str | None, before: float | None) -> list[sa.ColumnElement[bool]]:
        conditions = [queue_dlq.c.queue == self.queue]
        if (code := parse_reason(reason)) is not None:
            conditions.append(queue_dlq.c.reason == code.value)
        if before is not None:
            conditions.append(queue_dlq.c.failed_at < before)
        return conditions

    def add(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Store dead letters (`queue_dlq` rows) and count them, in the caller's transaction."""
        if not rows:
            return
        conn.execute(queue_dlq.insert(), rows)
        self.count(conn, (str(r["reason"]) for r in rows))

    def count(self, conn: sa.Connection, reasons: Iterable[str]) -> None:
        """Add letters to the lasting counts (one upsert, rows in name order), in the
        caller's transaction. Queues whose letters live elsewhere (SQS) count here too."""
        counts = Counter(reasons)
        named = sorted((self.prefix + reason, n) for reason, n in counts.items())
        if named:
            self.db.upsert_add_rows(conn, counters, ("name", "value"), named, ("name",))

    def uncount(self, conn: sa.Connection, reasons: Iterable[str]) -> None:
        """Take letters out of the count (never below 0), in the caller's transaction."""
        counts = Counter(reasons)
        stmt = (
            counters.update()
            .where(counters.c.name == sa.bindparam("counter"))
            .values(value=self.db.greatest(counters.c.value - sa.bindparam("n"), 0))
        )
        conn.execute(stmt, [{"counter": self.prefix + r, "n": n} for r, n in sorted(counts.items())])

    def fetch(self, limit: int, reason: str | None, before: float | None) -> list[dict[str, Any]]:
        stmt = sa.select(queue_dlq).where(*self._where(reason, before)).order_by(queue_dlq.c.seq).limit(limit)
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        return [
            {
                "message_id": r.message_id,
                "attempts": r.attempts,
                "reason": r.reason,
                "error": r.error,
                "failed_at": clock.iso(r.failed_at),
                "body": bytes(r.body).decode("utf-8", errors="replace"),
            }
            for r in rows
        ]

    def take(self, conn: sa.Connection, limit: int | None, reason: str | None, before: float | None) -> list[Any]:
        """Delete the oldest letters matching the filters (at most `limit`) and take them
        out of the count, in the caller's transaction; returns them in DLQ order (seq,
        message_id, content_type, body, enqueued_at, reason). Only rows this statement
        deleted are returned, so two concurrent redrives never take one letter twice."""
        pick = sa.select(queue_dlq.c.seq).where(*self._where(reason, before)).order_by(queue_dlq.c.seq)
        if limit is not None:
            pick = pick.limit(limit)
        stmt = queue_dlq.delete().where(queue_dlq.c.seq.in_(pick.scalar_subquery())).returning(*TAKEN)
        rows = sorted(conn.execute(stmt).all(), key=lambda r: r.seq)
        if rows:
            self.uncount(conn, (r.reason for r in rows))
        return rows

    def purge(self, reason: str | None, before: float | None) -> int:
        where = self._where(reason, before)
        with self.db.transaction() as conn:
            return int(conn.execute(queue_dlq.delete().where(*where)).rowcount)

    def totals(self) -> dict[str, int]:
        stmt = sa.select(counters.c.name, counters.c.value).where(
            counters.c.name.startswith(self.prefix, autoescape=True)
        )
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        out = {r.value: 0 for r in DeadReason}
        for name, value in rows:
            reason = name[len(self.prefix) :]
            if "." not in reason:  # not a queue whose name extends this one's
                out[reason] = int(value)
        return out
