"""Getting accepted events into the queue from the event loop, fast and durably.

`GroupSender` is group commit: requests that arrive while a `send_batch` is in flight are
coalesced into the next one, so N concurrent requests cost one transaction (one fsync on
SQLite) instead of N transactions fighting over the write lock. Every request still gets
its answer only after the transaction holding its events has committed. Sends run in a
worker thread so the event loop never blocks on the database.

`DepthGauge` caches the queue depth for `interval` seconds (counting what was accepted in
between), because counting the queue on every request would cost more than the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from anyio import to_thread

from pipeline import clock
from pipeline.bindings.queue import Queue

MAX_GROUP_EVENTS = 10_000


class GroupSender:
    def __init__(self, queue: Queue, max_group: int = MAX_GROUP_EVENTS) -> None:
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
        group, n = [], 0
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
    def __init__(self, queue: Queue, interval: float) -> None:
        self.queue = queue
        self.interval = interval
        self._value = 0
        self._at: float | None = None
        self._reading: asyncio.Future[int] | None = None

    async def depth(self) -> int:
        """The cached depth, re-read when older than `interval`. One reading at a time:
        requests arriving while the queue is being counted wait for that count."""
        if self._at is not None and clock.monotonic() - self._at < self.interval:
            return self._value
        if self._reading is None:
            self._reading = asyncio.ensure_future(to_thread.run_sync(self.queue.depth))
            try:
                self._value = await asyncio.shield(self._reading)
                self._at = clock.monotonic()
            finally:
                self._reading = None
            return self._value
        return await asyncio.shield(self._reading)

    def add(self, n: int) -> None:
        self._value += n
