"""Getting accepted events into the queue from the event loop, fast and durably.

`pack` puts a request's (or a collector batch's) events into as few queue messages as the
queue's size limit allows, each a JSON array of events: the consumer stores every element
on its own, so one message row carries up to a request's worth of events instead of one.

`GroupSender` is group commit: requests that arrive while a `send_batch` is in flight are
coalesced into the next one, so N concurrent requests cost one transaction (one fsync on
SQLite) instead of N transactions fighting over the write lock. Every request still gets
its answer only after the transaction holding its events has committed. Sends run in a
worker thread so the event loop never blocks on the database.

`DepthGauge` answers "is the queue over its limit?" (in messages) for backpressure from a
reading reused for `interval` seconds (counting what was enqueued in between), because
counting the queue on every request would cost more than the request; a reading is usually
an upper bound found in two index lookups rather than a count.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import orjson
from anyio import to_thread

from pipeline import clock
from pipeline.bindings.queue import MAX_MESSAGE_BYTES, Queue

MAX_GROUP_MESSAGES = 256  # per transaction: at most 32 MiB of bodies


def pack(events: list[Any]) -> tuple[list[Any], list[int]]:
    """`events` in order as JSON-array message bodies of at most `MAX_MESSAGE_BYTES` each,
    and the positions of the events left out because they exceed it on their own. When the
    whole array fits (the common case) it is encoded once, and that encoding is the body (a
    `msgspec.Raw`, which the queue stores as it is); else each event is encoded to measure it."""
    if not events:
        return [], []
    data = orjson.dumps(events)
    if len(data) <= MAX_MESSAGE_BYTES:
        return [msgspec.Raw(data)], []
    bodies: list[list[Any]] = []
    too_large: list[int] = []
    body: list[Any] = []
    size = 1  # "["
    for i, event in enumerate(events):
        n = len(orjson.dumps(event)) + 1  # and its "," or "]"
        if 1 + n > MAX_MESSAGE_BYTES:
            too_large.append(i)
            continue
        if size + n > MAX_MESSAGE_BYTES:
            bodies.append(body)
            body, size = [], 1
        body.append(event)
        size += n
    if body:
        bodies.append(body)
    return bodies, too_large


class GroupSender:
    def __init__(self, queue: Queue, max_group: int = MAX_GROUP_MESSAGES) -> None:
        self.queue = queue
        self.max_group = max_group
        self._pending: list[tuple[list[Any], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def send(self, bodies: list[Any]) -> None:
        """Return once `bodies` are durably enqueued; raise what `send_batch` raised."""
        if not bodies:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((bodies, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        await asyncio.shield(fut)

    def _take(self) -> list[tuple[list[Any], asyncio.Future[None]]]:
        group: list[tuple[list[Any], asyncio.Future[None]]] = []
        n = 0
        while self._pending and (not group or n + len(self._pending[0][0]) <= self.max_group):
            entry = self._pending.pop(0)
            group.append(entry)
            n += len(entry[0])
        return group

    async def _run(self) -> None:
        while self._pending:
            group = self._take()
            try:
                await to_thread.run_sync(self.queue.send_batch, [b for bodies, _ in group for b in bodies])
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], exc)
                    continue
                # One request's failure must not fail its neighbours: send them one by one.
                for bodies, fut in group:
                    try:
                        await to_thread.run_sync(self.queue.send_batch, bodies)
                    except Exception as one:
                        _settle(fut, one)
                    else:
                        _settle(fut, None)
                continue
            for _, fut in group:
                _settle(fut, None)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: the waiter may have gone away


class DepthGauge:
    """Whether the queue holds more than `limit` messages (not events: a message holds up to
    a request's worth), from a reading that is reused for `interval` seconds (plus the
    messages this process enqueued since).

    A reading is `Queue.depth_estimate`: a backend may answer with a cheap upper bound while
    that bound is within the limit (the SQL queue does). One reading at a time: requests arriving while
    the queue is being read wait for that reading."""

    def __init__(self, queue: Queue, limit: int, interval: float) -> None:
        self.queue = queue
        self.limit = limit
        self.interval = interval
        self._value = 0
        self._exact = True  # whether _value is a count (else an upper bound)
        self._at: float | None = None
        self._reading: asyncio.Future[None] | None = None

    async def over_limit(self) -> bool:
        stale = self._at is None or clock.monotonic() - self._at >= self.interval
        if stale or (self._value > self.limit and not self._exact):
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._refresh())
            await asyncio.shield(self._reading)
        return self._value > self.limit

    async def _refresh(self) -> None:
        try:
            self._value, self._exact = await to_thread.run_sync(self._read)
            self._at = clock.monotonic()
        finally:
            self._reading = None

    def _read(self) -> tuple[int, bool]:
        """(depth or an upper bound of it, whether that is the depth itself)"""
        return self.queue.depth_estimate(self.limit)

    def add(self, n: int) -> None:
        """Count `n` messages this process enqueued since the reading."""
        self._value += n
