"""`TrafficCollector`: ASGI middleware that turns an app's own requests into edgepipe events.

    app.add_middleware(TrafficCollector, queue=env.QUEUE)                  # local queue binding
    app.add_middleware(TrafficCollector, endpoint="http://edgepipe:8787", token="ep_…")

After each response is sent it records method, the route template when the framework
knows it (Starlette/FastAPI put the matched route in `scope["route"]`: `/users/{id}`), else
the normalised path, status, duration, host and response bytes. Recording is an append of
a tuple (values the request's scope already holds) to a bounded in-memory buffer and nothing
else: the request never waits on, and never fails because of, the collector. A background
task turns the tuples into events (route template or normalised path, host, ids) and sends
them in batches, the blocking enqueue on a worker thread; when the buffer
is full, new events are dropped and counted (`stats.dropped`), because slowing the app
down to protect its statistics would be the wrong trade. The buffer is flushed on
shutdown (ASGI lifespan) or by `await collector.flush()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline import clock, log
from pipeline.bindings.queue import Queue
from pipeline.config import Paths
from pipeline.events import MAX_RESPONSE_TIME_MS, storable
from pipeline.http.client import HttpSink, QueueSink, Sink
from pipeline.ids import uuid7_batch
from pipeline.paths import PathNormalizer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_EXCLUDE = ("/health", "/ready", "/metrics")
FIELDS = 9  # values per request in the buffer


@dataclass
class CollectorStats:
    recorded: int = 0  # events put in the buffer
    sent: int = 0  # events handed to the sink successfully
    dropped: int = 0  # buffer full
    failed: int = 0  # the sink gave up on them
    errors: int = 0  # recording itself failed (never propagated to the request)


class TrafficCollector:
    def __init__(
        self,
        app: ASGIApp,
        sink: Sink | None = None,
        *,
        queue: Queue | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        sample_rate: float = 1.0,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        buffer_size: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        host: str | None = None,
        colo: str | None = None,
        paths: Paths | None = None,
        stats: CollectorStats | None = None,
    ) -> None:
        if sum(x is not None for x in (sink, queue, endpoint)) != 1:
            raise ValueError("TrafficCollector needs exactly one of sink=, queue= or endpoint=")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate}")
        if buffer_size < 1 or batch_size < 1:
            raise ValueError("buffer_size and batch_size must be ≥ 1")
        self.app = app
        self.sink: Sink = sink or (QueueSink(queue) if queue is not None else HttpSink(endpoint or "", token))
        self.sample_rate = sample_rate
        self.exclude = tuple(exclude)
        self._excluded = frozenset(self.exclude)
        self._excluded_prefixes = tuple(prefix + "/" for prefix in self.exclude)
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.host = host
        self.colo = colo
        self.normalizer = PathNormalizer(paths or Paths())
        self.stats = stats if stats is not None else CollectorStats()
        self._buffer: list[Any] = []  # FIELDS values per request: see _record
        self._limit, self._batch_fields = buffer_size * FIELDS, batch_size * FIELDS
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._send_lock: asyncio.Lock | None = None
        self._closing = False

    # -- the request path: cheap, never raises ---------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                receive = self._lifespan_receive(receive)
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (path in self._excluded or path.startswith(self._excluded_prefixes)
                or (self.sample_rate < 1.0 and random.random() >= self.sample_rate)):  # fmt: skip
            await self.app(scope, receive, send)
            return
        response = _Response(send)
        try:
            await self.app(scope, receive, response.send)
        finally:
            try:
                self._record(scope, response)
            except Exception:
                self.stats.errors += 1

    def _record(self, scope: Scope, response: _Response) -> None:
        """Append what the event needs to the buffer; the flusher builds the event. The
        buffer is one flat list of `FIELDS` values a request, none of them a new container
        (the host is the Host header's bytes or the server's name): a tuple or the scope's
        header list kept until the flush would make the garbage collector run several times
        as often and promote every record to older generations."""
        buffer = self._buffer
        if len(buffer) >= self._limit:
            self.stats.dropped += 1
            return
        host: bytes | str = ""
        if not self.host:
            for name, value in scope.get("headers") or ():
                if name == b"host":
                    host = value
                    break
            else:
                server = scope.get("server")
                host = str(server[0]) if server else ""
        buffer += (response.started, response.ended or clock.monotonic(), scope["method"], scope.get("route"),
                   scope.get("root_path", ""), scope["path"], host, response.status, response.nbytes)  # fmt: skip
        self.stats.recorded += 1
        if self._task is None or self._task.done():
            self._ensure_task()
        if len(buffer) >= self._batch_fields and self._wake is not None:
            self._wake.set()

    # -- the background side ------------------------------------------------------------

    def _ensure_task(self) -> None:
        if (self._task is None or self._task.done()) and not self._closing:
            self._wake = asyncio.Event()
            self._send_lock = asyncio.Lock()
            self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def _flusher(self) -> None:
        assert self._wake is not None
        while not self._closing:
            if len(self._buffer) < self._batch_fields:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            if not self._closing:
                await self._send_one_batch()

    async def _send_one_batch(self) -> int:
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        async with self._send_lock:
            n = min(self._batch_fields, len(self._buffer))
            if not n:
                return 0
            records = self._buffer[:n]
            del self._buffer[:n]
            try:
                batch = self._events(records)  # ids before the first try: retries keep them
            except Exception:
                batch = []
                for i in range(0, n, FIELDS):
                    try:
                        batch.extend(self._events(records[i : i + FIELDS]))
                    except Exception:
                        self.stats.errors += 1
            n = len(batch)
            try:
                await self.sink.send(batch)
            except Exception as exc:
                self.stats.failed += n
                log.event("collector_send_failed", logging.WARNING, events=n, error=f"{type(exc).__name__}: {exc}")
            else:
                self.stats.sent += n
            return n

    def _events(self, records: list[Any]) -> list[dict[str, Any]]:
        """The events of buffered records (`FIELDS` values each), with fresh ids. A record's
        `ts` is its start on the wall clock: its monotonic start shifted by the wall clock's
        offset now."""
        offset = clock.now_ms() - clock.monotonic() * 1000
        max_length = self.normalizer.cfg.max_length
        fields = iter(records)
        events = []
        for event_id, started, ended, method, route, root_path, path, host, status, nbytes in zip(
            uuid7_batch(len(records) // FIELDS), *[fields] * FIELDS, strict=True
        ):
            template = getattr(route, "path_format", None)
            full = storable(root_path + template if template else self.normalizer.normalize(root_path + path))
            full = full[:max_length]
            if type(host) is bytes:
                host = _hostname(host)
            event = {
                "id": event_id,
                "ts": int(started * 1000 + offset),
                "method": method,
                "path": full,
                "status": status,
                "response_time_ms": min(round((ended - started) * 1000, 3), MAX_RESPONSE_TIME_MS),
                "host": self.host or host,
                "bytes": nbytes,
            }
            if self.colo:
                event["colo"] = self.colo
            events.append(event)
        return events

    async def flush(self) -> None:
        """Send everything buffered now (also what the background task has not taken yet)."""
        while self._buffer:
            await self._send_one_batch()

    async def aclose(self) -> None:
        """Stop the background task, flush the buffer, close the sink (on lifespan shutdown)."""
        self._closing = True
        if self._task is not None:
            if self._wake is not None:
                self._wake.set()
            await self._task  # it finishes the batch in hand, then stops
            self._task = None
        await self.flush()
        await self.sink.aclose()

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        return wrapped


class _Response:
    """Wraps `send` to note when the request started, the status, the body bytes and when the
    last byte went out. `send` is a plain function returning the wrapped send's awaitable (no
    coroutine of its own per message)."""

    __slots__ = ("_send", "ended", "nbytes", "started", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status, self.nbytes, self.ended = 500, 0, 0.0
        self.started = clock.monotonic()

    def send(self, message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.body":
            self.nbytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.ended = clock.monotonic()
        elif kind == "http.response.start":
            self.status = message["status"]
        return self._send(message)


@lru_cache(maxsize=256)
def _hostname(value: bytes) -> str:
    """The host of a Host header value, lower case, without the port."""
    text = value.decode("latin-1").lower()
    return text.split("]")[0] + "]" if text.startswith("[") else text.partition(":")[0]
