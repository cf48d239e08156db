"""QUEUE backend on tables in the DB binding's database (SQLite or PostgreSQL).

A receive is one short transaction that leases rows (`UPDATE … RETURNING`, with
`FOR UPDATE SKIP LOCKED` on PostgreSQL so concurrent consumers never take the same row).
Settling runs in the caller's transaction when there is one: the embedded consumer acks
its batch in the same commit as the rows it wrote.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.bindings.queue import (
    REASON_RETRIES,
    Message,
    MessageBatch,
    Queue,
    QueueSettings,
    decode_body,
    encode_body,
    message_time,
    split_dead,
)
from pipeline.errors import ValidationError
from pipeline.ids import uuid7
from pipeline.schema import queue_dlq, queue_messages

q = queue_messages
POLL_INTERVAL_S = 0.05
SEND_CHUNK = 1000


class SqlQueue(Queue):
    shares_transaction = True

    def __init__(self, db: Database, name: str = "events", settings: QueueSettings | None = None):
        self.db = db
        self.name = name
        self.settings = settings or QueueSettings()

    def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        now = clock.now_s()
        rows = []
        for body in bodies:
            data, kind = encode_body(body)
            rows.append(
                {
                    "queue": self.name,
                    "message_id": uuid7(),
                    "content_type": kind,
                    "body": data,
                    "enqueued_at": now,
                    "visible_at": now,
                    "attempts": 0,
                }
            )
        if not rows:
            return []
        with self.db.transaction() as conn:
            for i in range(0, len(rows), SEND_CHUNK):
                conn.execute(q.insert(), rows[i : i + SEND_CHUNK])
        return [r["message_id"] for r in rows]

    # -- consuming ----------------------------------------------------------------

    def _claim(self, n: int, lease: str) -> list[Message]:
        now = clock.now_s()
        ready = (
            sa.select(q.c.seq)
            .where(q.c.queue == self.name, q.c.visible_at <= now)
            .order_by(q.c.visible_at, q.c.seq)
            .limit(n)
        )
        if self.db.dialect == "postgresql":
            ready = ready.with_for_update(skip_locked=True)
        stmt = (
            q.update()
            .where(q.c.seq.in_(ready.scalar_subquery()))
            .values(
                attempts=q.c.attempts + 1,
                visible_at=now + self.settings.visibility_timeout,
                lease=lease,
            )
            .returning(q.c.seq, q.c.message_id, q.c.enqueued_at, q.c.attempts, q.c.content_type, q.c.body)
        )
        with self.db.transaction() as conn:
            rows = conn.execute(stmt).all()
        rows.sort(key=lambda r: r.seq)
        out = []
        for r in rows:
            try:
                body = decode_body(r.body, r.content_type)
            except ValueError as exc:  # stored json that no longer parses: poison
                body = bytes(r.body)
                msg = Message(r.message_id, message_time(r.enqueued_at), r.attempts, body, r.seq)
                msg.dead_letter("invalid", f"body: malformed JSON: {exc}")
                out.append(msg)
                continue
            out.append(Message(r.message_id, message_time(r.enqueued_at), r.attempts, body, r.seq))
        return out

    def receive(self, max_messages: int, wait_seconds: float = 0.0) -> MessageBatch:
        if max_messages < 1:
            raise ValidationError("max_messages", "must be ≥ 1")
        lease = secrets.token_hex(8)
        batch = MessageBatch(self.name, [], lease)
        deadline = clock.monotonic() + wait_seconds
        while True:
            batch.messages += self._claim(max_messages - len(batch.messages), lease)
            if len(batch.messages) >= max_messages or clock.monotonic() >= deadline:
                return batch
            clock.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - clock.monotonic())))

    def settle(self, batch: MessageBatch, failure: str | None = None) -> None:
        acks: list[int] = []
        retries: list[tuple[Message, float]] = []
        dead: list[tuple[Message, str, str]] = []
        limit = 1 + self.settings.max_retries
        for m in batch.messages:
            decision = m.decision or "ack"
            if failure is not None and decision != "dead":
                decision = "retry"  # the batch's writes rolled back: acks are void
            if decision == "ack":
                acks.append(m.handle)
            elif decision == "dead":
                dead.append((m, *split_dead(m.error)))
            elif m.attempts >= limit:
                last = failure or "retried by the consumer"
                dead.append((m, REASON_RETRIES, f"{m.attempts} deliveries; last error: {last}"))
            else:
                delay = self.settings.retry_delay if m.delay is None else m.delay
                retries.append((m, delay))
        now = clock.now_s()
        mine = sa.and_(q.c.lease == batch.lease, q.c.seq.in_(sa.bindparam("seqs", expanding=True)))
        with self.db.transaction() as conn:
            if acks:
                conn.execute(q.delete().where(mine), {"seqs": acks})
            if dead:
                self._move_to_dlq(conn, batch.lease, dead, now)
            for m, delay in retries:
                conn.execute(
                    q.update()
                    .where(q.c.seq == m.handle, q.c.lease == batch.lease)
                    .values(visible_at=now + delay, lease=None, last_error=failure)
                )

    def _move_to_dlq(self, conn: sa.Connection, lease: str, dead: list, now: float) -> None:
        seqs = [m.handle for m, _, _ in dead]
        stored = {
            r.seq: r
            for r in conn.execute(
                sa.select(q.c.seq, q.c.message_id, q.c.content_type, q.c.body, q.c.enqueued_at).where(
                    q.c.lease == lease, q.c.seq.in_(seqs)
                )
            )
        }
        rows = [
            {
                "queue": self.name,
                "message_id": r.message_id,
                "content_type": r.content_type,
                "body": r.body,
                "enqueued_at": r.enqueued_at,
                "failed_at": now,
                "attempts": m.attempts,
                "reason": reason,
                "error": error,
            }
            for m, reason, error in dead
            if (r := stored.get(m.handle)) is not None
        ]
        if rows:
            conn.execute(queue_dlq.insert(), rows)
            conn.execute(q.delete().where(q.c.lease == lease, q.c.seq.in_(list(stored))))

    # -- operations -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        now = clock.now_s()
        in_flight = sa.and_(q.c.lease.is_not(None), q.c.visible_at > now)
        with self.db.read() as conn:
            pending, flying = conn.execute(
                sa.select(
                    sa.func.count().filter(sa.not_(in_flight)),
                    sa.func.count().filter(in_flight),
                ).where(q.c.queue == self.name)
            ).one()
            reasons = conn.execute(
                sa.select(queue_dlq.c.reason, sa.func.count())
                .where(queue_dlq.c.queue == self.name)
                .group_by(queue_dlq.c.reason)
            ).all()
        out = {"pending": pending, "in_flight": flying, "dlq": sum(n for _, n in reasons)}
        out.update({f"dlq_{reason}": n for reason, n in sorted(reasons)})
        return out

    def dlq_list(self, limit: int = 100) -> list[dict[str, Any]]:
        d = queue_dlq
        with self.db.read() as conn:
            rows = conn.execute(sa.select(d).where(d.c.queue == self.name).order_by(d.c.seq).limit(limit)).all()
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

    def dlq_redrive(self, limit: int | None = None) -> int:
        d = queue_dlq
        now = clock.now_s()
        with self.db.transaction() as conn:
            sel = sa.select(d).where(d.c.queue == self.name).order_by(d.c.seq)
            rows = conn.execute(sel if limit is None else sel.limit(limit)).all()
            if not rows:
                return 0
            conn.execute(
                q.insert(),
                [
                    {
                        "queue": self.name,
                        "message_id": r.message_id,
                        "content_type": r.content_type,
                        "body": r.body,
                        "enqueued_at": r.enqueued_at,
                        "visible_at": now,
                        "attempts": 0,
                    }
                    for r in rows
                ],
            )
            conn.execute(d.delete().where(d.c.seq.in_([r.seq for r in rows])))
        return len(rows)
