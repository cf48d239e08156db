"""QUEUE backend on tables in the DB binding's database (SQLite or PostgreSQL).

Two ways to take messages:

* inside the caller's transaction (how the worker loop consumes): the rows are taken in
  that transaction and are gone with the same commit as the rows the handler wrote. On
  SQLite they are selected under its write lock and acks delete them; on PostgreSQL one
  `DELETE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING` takes them (so
  concurrent consumers never take the same row, and each row is written once, not locked
  then deleted), and a settle writes back the messages that stay: retried ones with their
  delay, dead ones to the DLQ. Nothing is written to claim them: if the consumer dies, its
  transaction rolls back and the messages are visible again at once. (A crash therefore
  does not count as a delivery attempt; a handler error does.) A pipelined worker's
  handler may ask for the batches to come to be taken ahead (`take_ahead`): after a full
  batch the next take is then sent at once, in a transaction opened ahead
  (`Database.open_ahead`), which the next batch runs in; a take ahead that came back short
  is topped up then.
* outside a transaction: a short transaction leases the rows (`UPDATE … RETURNING`) for
  `visibility_timeout` seconds; they reappear if the consumer dies holding them.

Dead letters and their lasting counts are `SqlDeadLetters`' (queue_sql_dlq.py): a settle
stores and counts its letters in its own transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from functools import partial
from operator import attrgetter
from typing import Any

import msgspec
import orjson
import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.bindings.queue import (
    MAX_MESSAGE_BYTES,
    Decisions,
    Message,
    MessageBatch,
    Queue,
    QueueSettings,
    decide,
    encode_body,
)
from pipeline.bindings.queue_sql_dlq import SqlDeadLetters
from pipeline.errors import ValidationError
from pipeline.ids import uuid7_batch
from pipeline.schema import queue_dlq, queue_messages

POLL_INTERVAL_S = 0.05
SEND_CHUNK = 1000
FLOOR_TAKES = 16  # PostgreSQL: takes from a floor between two from the start (`SqlQueue._take_statement`)
RETURNED = (
    queue_messages.c.seq,
    queue_messages.c.message_id,
    queue_messages.c.enqueued_at,
    queue_messages.c.attempts,
    queue_messages.c.content_type,
    queue_messages.c.body,
)
_TAKE_ARGS = ("now", "n", "floor")
SEND_COLUMNS = ("queue", "message_id", "content_type", "body", "enqueued_at", "visible_at", "attempts")


_DECISION, _PARTS, _HANDLE = attrgetter("decision"), attrgetter("dead_parts"), attrgetter("handle")


class SqlQueue(Queue):
    shares_transaction = True

    def __init__(self, db: Database, name: str = "events", settings: QueueSettings | None = None):
        self.db = db
        self.name = name
        self.settings = settings or QueueSettings()
        self.dlq = SqlDeadLetters(db, name)
        self._floor = self._floor_takes = 0  # PostgreSQL: where the next take starts (`_take_statement`)
        self._ahead = False  # PostgreSQL: take the next batch ahead (`take_ahead`)

    def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        now = clock.now_s()
        bodies = list(bodies)
        ids = uuid7_batch(len(bodies))
        rows = self._send_rows(bodies, ids, now)
        if rows:
            insert = self.db.cached(("queue_send",), queue_messages.insert)
            with self.db.transaction() as conn:
                for i in range(0, len(rows), SEND_CHUNK):
                    self.db.executemany(conn, insert, SEND_COLUMNS, rows[i : i + SEND_CHUNK])
        return ids

    def _send_rows(self, bodies: list[Any], ids: list[str], now: float) -> list[tuple[Any, ...]]:
        """The rows of a send, in `SEND_COLUMNS` order. Bodies that are all JSON already
        encoded (`msgspec.Raw`: what `edgepipe ingest` sends) within the size limit are
        taken in one pass; any other send goes body by body through `encode_body`, which
        also refuses what cannot be a message."""
        name = self.name
        if set(map(type, bodies)) == {msgspec.Raw} and max(map(len, bodies)) <= MAX_MESSAGE_BYTES:
            return [(name, mid, "json", bytes(body), now, now, 0) for mid, body in zip(ids, bodies, strict=True)]
        encoded = [encode_body(body) for body in bodies]
        return [(name, mid, kind, data, now, now, 0) for mid, (data, kind) in zip(ids, encoded, strict=True)]

    # -- consuming ----------------------------------------------------------------

    def _ready(self, columns: Any, floor: bool = False) -> sa.Select[Any]:
        stmt = (
            sa.select(*columns)
            .where(queue_messages.c.queue == self.name, queue_messages.c.visible_at <= sa.bindparam("now"))
            .order_by(queue_messages.c.seq)
            .limit(sa.bindparam("n"))
        )
        if floor:
            stmt = stmt.where(queue_messages.c.seq >= sa.bindparam("floor"))
        return stmt.with_for_update(skip_locked=True) if self.db.dialect == "postgresql" else stmt

    def _take_statement(self) -> Any:
        """The in-transaction take: a SELECT on SQLite (acks delete the rows), a DELETE …
        RETURNING on PostgreSQL. There the rows are found by the physical address (`ctid`)
        of the versions the subquery locked: a TID scan, where joining back on `seq`
        (`seq IN (…)`) hashed the keys and descended the primary key once a row (1.3 of
        the take's 2.8 ms of server time at 1000 messages). A locked row's address cannot
        change before the DELETE: no one else may update or delete it, and the subquery
        returns the address of the version it locked (a row updated meanwhile is locked
        and returned as its newest version).

        The walk starts at `seq >= floor` (`_next_floor`). A deleted row's index entry
        stays until the table is vacuumed (autovacuum comes after a fifth of the table
        changed, if it is on), and a take walking from the start steps over all of them:
        with 200,000 messages consumed before, 3.3 ms of server time a take against 2.3
        from the floor. After a full batch the next take starts after its last message
        (it need not step over the rows of batches still in flight, its own or other
        workers' before it); after a short one, and every `FLOOR_TAKES` takes, from the
        start, so that a message below the floor (a retry written back under its own
        `seq`, a batch another worker rolled back) waits at most that many batches; a take
        from a floor that comes back short takes the rest from the start at once (a queue
        is never seen empty while it holds a ready message)."""
        if self.db.dialect != "postgresql":
            return self._ready(RETURNED)
        ctid: sa.ColumnElement[Any] = sa.literal_column("ctid")
        locked = sa.func.array(self._ready([ctid], floor=True).scalar_subquery())
        return (
            queue_messages.delete()
            .where(sa.literal_column(f"{queue_messages.name}.ctid") == sa.any_(locked))
            .returning(*RETURNED)
        )

    def _lease_statement(self) -> sa.Update:
        return (
            queue_messages.update()
            .where(queue_messages.c.seq.in_(self._ready([queue_messages.c.seq]).scalar_subquery()))
            .values(
                attempts=queue_messages.c.attempts + 1, visible_at=sa.bindparam("until"), lease=sa.bindparam("lease")
            )
            .returning(*RETURNED)
        )

    def _claim(self, n: int, lease: str, now: float | None = None) -> list[Message]:
        now = clock.now_s() if now is None else now
        if lease:
            stmt = self.db.cached(("queue_lease", self.name), self._lease_statement)
            params = {"now": now, "n": n, "until": now + self.settings.visibility_timeout, "lease": lease}
            with self.db.transaction() as conn:
                rows = sorted(conn.execute(stmt, params).all(), key=lambda r: r[0])
        else:  # inside the caller's transaction: the transaction is the lease
            with self.db.transaction() as conn:
                if self.db.dialect == "postgresql":
                    ahead = self.db.opened_ahead()
                    rows = [] if ahead is None else ahead()
                    if len(rows) < n:  # none taken ahead, or fewer than ready now: the rest
                        rows = sorted(rows + self._take(conn, n - len(rows), now))
                    if len(rows) == n and self._ahead and self.db.commits_in_background():
                        self.db.open_ahead(partial(self._send_take, n=n))
                else:
                    stmt = self.db.cached(("queue_take", self.name), self._take_statement)
                    rows = self.db.fetchall(conn, stmt, ("now", "n"), (now, n))
        bump = 0 if lease else 1  # a leased row's attempts were incremented by the lease
        return [Message(mid, at, n + bump, data, kind, seq) for seq, mid, at, n, kind, data in rows]

    def _take(self, conn: sa.Connection, n: int, now: float) -> list[Any]:
        """PostgreSQL: take up to `n` ready messages in `conn`'s transaction (see
        `_take_statement`); their rows, by `seq`."""
        stmt = self.db.cached(("queue_take", self.name), self._take_statement)
        # A generic plan: it must walk the primary key, whatever the table's statistics.
        # Redoable: a commit lost in a crash gives the batch back, so it need not wait for the disk.
        rows = self.db.fetchall(conn, stmt, _TAKE_ARGS, (now, n, self._floor), generic=True, redoable=True)
        if len(rows) < n and self._floor:  # short: the rest from the start
            rows += self.db.fetchall(conn, stmt, _TAKE_ARGS, (now, n - len(rows), 0), generic=True)
        return self._taken(rows, n)

    def take_ahead(self, on: bool) -> None:
        """PostgreSQL, while `on`: a full batch taken in a transaction that commits in the
        background (a pipelined worker's) has the next take sent at once, in a transaction
        opened ahead (`Database.open_ahead`), which the next batch runs in. The server
        takes while this process decodes: a batch of duplicates costs the server little
        else. (A batch of new events is bound by the server's writes: taking ahead gains
        nothing there, and among several workers it only makes the others step over more
        locked rows: two workers did 1.11-1.28× one with it, 1.27-1.35× without.)"""
        self._ahead = on

    def _send_take(self, conn: sa.Connection, n: int) -> Callable[[], list[Any]]:
        """PostgreSQL: `_take` sent ahead (`Database.open_ahead`): the function that waits
        for its rows. (One that comes back short is topped up when its rows are used.)"""
        stmt = self.db.cached(("queue_take", self.name), self._take_statement)
        rows = self.db.send(conn, stmt, _TAKE_ARGS, (clock.now_s(), n, self._floor), generic=True, redoable=True)
        return lambda: self._taken(rows(), n)

    def _taken(self, rows: list[Any], n: int) -> list[Any]:
        """The rows of a take of up to `n` messages, by `seq`; the next take's floor set."""
        rows.sort()  # RETURNING keeps no order
        self._next_floor(rows, n)
        return rows

    def _next_floor(self, rows: list[Any], n: int) -> None:
        """Where the next take starts (see `_take_statement`): after the greatest `seq` of
        a full batch, 0 after a short one and every `FLOOR_TAKES` takes."""
        if len(rows) == n and self._floor_takes < FLOOR_TAKES:
            self._floor, self._floor_takes = rows[-1][0] + 1, self._floor_takes + 1
        else:
            self._floor, self._floor_takes = 0, 0

    def retake(self, batch: MessageBatch) -> MessageBatch:
        if batch.lease:
            return super().retake(batch)
        stmt = self.db.cached(("queue_retake", self.name), self._retake_statement)
        now = clock.now_s()
        with self.db.transaction() as conn:
            rows = conn.execute(stmt, {"now": now, "seqs": [m.handle for m in batch]}).all()
        messages = [Message(mid, at, n + 1, data, kind, seq) for seq, mid, at, n, kind, data in rows]
        return MessageBatch(self.name, messages)  # no taken_at: settle deletes these rows, never a range

    def _retake_statement(self) -> sa.Select[Any]:
        stmt = (
            sa.select(*RETURNED)
            .where(
                queue_messages.c.seq.in_(sa.bindparam("seqs", expanding=True)),
                queue_messages.c.visible_at <= sa.bindparam("now"),
            )
            .order_by(queue_messages.c.seq)
        )
        return stmt.with_for_update(skip_locked=True) if self.db.dialect == "postgresql" else stmt

    def release(self, batch: MessageBatch) -> None:
        if not batch.lease:
            return  # taken inside a transaction: its rollback released them
        with self.db.transaction() as conn:
            conn.execute(
                queue_messages.update()
                .where(queue_messages.c.seq.in_([m.handle for m in batch]), queue_messages.c.lease == batch.lease)
                .values(attempts=queue_messages.c.attempts - 1, visible_at=clock.now_s(), lease=None)
            )

    def wait(self, max_messages: int, wait_seconds: float) -> None:
        deadline = clock.monotonic() + wait_seconds
        if wait_seconds <= 0:
            return
        count = self.db.cached(
            ("queue_count_ready", self.name),
            lambda: sa.select(sa.func.count()).select_from(self._ready([queue_messages.c.seq]).subquery()),
        )
        while clock.monotonic() < deadline:
            with self.db.read() as conn:
                if conn.execute(count, {"now": clock.now_s(), "n": max_messages}).scalar_one() >= max_messages:
                    return
            clock.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - clock.monotonic())))

    def receive(self, max_messages: int, wait_seconds: float = 0.0) -> MessageBatch:
        if max_messages < 1:
            raise ValidationError("max_messages", "must be ≥ 1")
        if self.db.in_transaction():
            self.wait(max_messages, wait_seconds)
            now = clock.now_s()
            with self.db.transaction() as conn:
                taken_in = conn.get_transaction() if self.db.dialect == "postgresql" else None
                return MessageBatch(self.name, self._claim(max_messages, "", now), "", now, taken_in)
        lease = secrets.token_hex(8)
        batch = MessageBatch(self.name, [], lease)
        deadline = clock.monotonic() + wait_seconds
        while True:
            batch.messages += self._claim(max_messages - len(batch.messages), lease)
            if len(batch.messages) >= max_messages or clock.monotonic() >= deadline:
                return batch
            clock.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - clock.monotonic())))

    def settle(self, batch: MessageBatch, failure: str | None = None) -> None:
        messages = batch.messages
        if failure is None and set(map(_DECISION, messages)) <= {None, "ack"} and not any(map(_PARTS, messages)):
            decided = Decisions()  # the rule: every message acked, whole
            acks = list(map(_HANDLE, messages))
        else:
            decided = decide(messages, failure, self.settings)
            acks = [m.handle for m in decided.acks]
        parts, retries, dead = decided.parts, decided.retries, decided.dead
        now = clock.now_s()
        with self.db.transaction() as conn:
            if batch.taken_in is not None and conn.get_transaction() is batch.taken_in:
                self._write_back(conn, parts, retries, dead, failure, now)
                return
            if acks and batch.lease and len(acks) == len(batch.messages):  # a range guarded by the lease
                conn.execute(self._delete_range(), {"lo": min(acks), "hi": max(acks), "lease": batch.lease})
            elif acks and not batch.lease and len(acks) == len(batch.messages) and batch.taken_at is not None \
                    and self.db.dialect == "sqlite":  # fmt: skip
                # Taken in this transaction under SQLite's write lock: the rows of the range
                # that the take's own condition selects are exactly the batch.
                self.db.execute(
                    conn, self._delete_taken_range(), ("lo", "hi", "now"), (acks[0], acks[-1], batch.taken_at)
                )
            elif acks and not batch.lease:  # taken in this transaction: exactly these rows
                self.db.delete_keys(conn, queue_messages, "seq", acks)
            elif acks:
                conn.execute(
                    queue_messages.delete().where(queue_messages.c.seq.in_(acks), queue_messages.c.lease == batch.lease)
                )
            if not parts and not dead and not retries:
                return
            mine = queue_messages.c.lease == batch.lease if batch.lease else queue_messages.c.lease.is_(None)
            letters = self._dead_parts_to_dlq(parts, now) if parts else []
            if dead:
                letters += self._move_to_dlq(conn, mine, dead, now)
            self.dlq.add(conn, letters)  # one insert, one upsert of the counts
            for m, delay in retries:
                conn.execute(
                    queue_messages.update()
                    .where(queue_messages.c.seq == m.handle, mine)
                    .values(attempts=m.attempts, visible_at=now + delay, lease=None, last_error=failure)
                )

    def _write_back(self, conn: sa.Connection, parts: list[Message], retries: list[tuple[Message, float]],
                    dead: list[tuple[Message, str, str]], failure: str | None, now: float) -> None:  # fmt: skip
        """Settle a batch whose rows its own transaction deleted as it took them: acks are
        done already; retried messages go back under their own `seq` (their place in the
        queue) with their delay, dead ones and dead array elements to the DLQ."""
        letters = self._dead_parts_to_dlq(parts, now) if parts else []
        letters += [self._letter(m, m.id, m.content_type, m.raw, reason, error, now) for m, reason, error in dead]
        if letters:
            self.dlq.add(conn, letters)
        if retries:
            conn.execute(
                queue_messages.insert(),
                [
                    {"seq": m.handle, "queue": self.name, "message_id": m.id, "content_type": m.content_type,
                     "body": m.raw, "enqueued_at": m.enqueued_at, "visible_at": now + delay, "attempts": m.attempts,
                     "lease": None, "last_error": failure}
                    for m, delay in retries
                ],
            )  # fmt: skip

    def _delete_range(self) -> sa.Delete:
        def build() -> sa.Delete:
            span = queue_messages.c.seq.between(sa.bindparam("lo"), sa.bindparam("hi"))
            return queue_messages.delete().where(span, queue_messages.c.lease == sa.bindparam("lease"))

        return self.db.cached(("queue_delete_range",), build)

    def _delete_taken_range(self) -> sa.Delete:
        def build() -> sa.Delete:
            span = queue_messages.c.seq.between(sa.bindparam("lo"), sa.bindparam("hi"))
            return queue_messages.delete().where(
                span, queue_messages.c.queue == self.name, queue_messages.c.visible_at <= sa.bindparam("now")
            )

        return self.db.cached(("queue_delete_taken_range", self.name), build)

    def _dead_parts_to_dlq(self, messages: list[Message], now: float) -> list[dict[str, Any]]:
        """The DLQ rows of the array elements that acked messages dead-lettered."""
        rows: list[dict[str, Any]] = []
        for m in messages:
            items = orjson.loads(m.raw)
            rows += [
                self._letter(m, f"{m.id}:{index}", "json", orjson.dumps(items[index]), part.reason, part.error, now)
                for index, part in m.dead_parts or ()
            ]
        return rows

    def _letter(self, m: Message, message_id: str, content_type: str, body: bytes, reason: str, error: str,
                now: float) -> dict[str, Any]:  # fmt: skip
        """The DLQ row of a dead message (or of one element of its array body)."""
        return {
            "queue": self.name, "message_id": message_id, "content_type": content_type, "body": body,
            "enqueued_at": m.enqueued_at, "failed_at": now, "attempts": m.attempts, "reason": reason, "error": error,
        }  # fmt: skip

    def _move_to_dlq(self, conn: sa.Connection, mine: Any, dead: list, now: float) -> list[dict[str, Any]]:
        """Delete the dead messages still held by this batch from the queue (one DELETE …
        RETURNING); returns their DLQ rows (for `SqlDeadLetters.add`, in the same
        transaction)."""
        seqs = [m.handle for m, _, _ in dead]
        held = set(
            conn.execute(
                queue_messages.delete().where(queue_messages.c.seq.in_(seqs), mine).returning(queue_messages.c.seq)
            ).scalars()
        )
        return [self._letter(m, m.id, m.content_type, m.raw, reason, error, now) for m, reason, error in dead
                if m.handle in held]  # fmt: skip

    # -- operations -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        now = clock.now_s()
        in_flight = sa.and_(queue_messages.c.lease.is_not(None), queue_messages.c.visible_at > now)
        with self.db.read() as conn:
            pending, flying = conn.execute(
                sa.select(
                    sa.func.count().filter(sa.not_(in_flight)),
                    sa.func.count().filter(in_flight),
                ).where(queue_messages.c.queue == self.name)
            ).one()
            reasons = conn.execute(
                sa.select(queue_dlq.c.reason, sa.func.count())
                .where(queue_dlq.c.queue == self.name)
                .group_by(queue_dlq.c.reason)
            ).all()
        out = {"pending": pending, "in_flight": flying, "dlq": sum(n for _, n in reasons)}
        out.update({f"dlq_{reason}": n for reason, n in sorted(reasons)})
        return out

    def oldest_age_s(self) -> float:
        stmt = self.db.cached(
            ("queue_oldest", self.name),
            lambda: sa.select(sa.func.min(queue_messages.c.enqueued_at)).where(queue_messages.c.queue == self.name),
        )
        with self.db.read() as conn:
            oldest = conn.execute(stmt).scalar()
        return max(0.0, clock.now_s() - float(oldest)) if oldest is not None else 0.0

    def depth_estimate(self, limit: int) -> tuple[int, bool]:
        """The span of the queue's sequence numbers (max - min + 1: two primary-key
        lookups) bounds its depth from above; the queue is counted (a scan: ~70 ms at 500k
        messages) only when that bound exceeds `limit`, i.e. when the queue is nearly full
        or has wide gaps (messages held back by retries)."""

        def build() -> sa.Select[Any]:
            seq, mine = queue_messages.c.seq, queue_messages.c.queue == self.name
            ends = [
                sa.select(seq).where(mine).order_by(order).limit(1).scalar_subquery() for order in (seq, seq.desc())
            ]
            return sa.select(*ends)

        with self.db.read() as conn:
            first, last = conn.execute(self.db.cached(("queue_span", self.name), build)).one()
        bound = 0 if first is None else int(last) - int(first) + 1
        return (bound, False) if bound <= limit else (self.depth(), True)

    def dlq_list(
        self, limit: int = 100, reason: str | None = None, before: float | None = None
    ) -> list[dict[str, Any]]:
        return self.dlq.fetch(limit, reason, before)

    def dlq_redrive(self, limit: int | None = None, reason: str | None = None, before: float | None = None) -> int:
        now = clock.now_s()
        with self.db.transaction() as conn:
            rows = self.dlq.take(conn, limit, reason, before)
            if rows:
                conn.execute(
                    queue_messages.insert(),
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
        return len(rows)

    def dlq_purge(self, reason: str | None = None, before: float | None = None) -> int:
        return self.dlq.purge(reason, before)

    def rejected_totals(self) -> dict[str, int]:
        return self.dlq.totals()
