"""Sending events to edgepipe from async code: over HTTP with retries, or to a local queue.

Both sinks have one method, `async send(events)`, which the traffic collector calls with a
batch. `HttpSink` retries connection errors, 429 and 5xx with exponential backoff (honouring
`Retry-After`) and gives up at once on other 4xx, which retrying cannot fix. Events carry
their own `id`, so a retry after a lost response is deduplicated by the consumer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Protocol

import httpx
import orjson
from anyio import to_thread

from pipeline import log
from pipeline.bindings.queue import MAX_MESSAGE_BYTES, Queue
from pipeline.errors import MessageTooLarge, TransientError, ValidationError
from pipeline.http.enqueue import pack

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0


class Sink(Protocol):
    async def send(self, events: list[dict[str, Any]]) -> None: ...

    async def aclose(self) -> None: ...


class QueueSink:
    """Enqueue into a local queue binding, as JSON-array messages (`enqueue.pack`); the
    blocking `send_batch` runs in a thread. An event too large for a message on its own
    fails the batch (MessageTooLarge) before anything is enqueued."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def send(self, events: list[dict[str, Any]]) -> None:
        bodies, too_large = pack(events)
        if too_large:
            raise MessageTooLarge("event", f"{len(too_large)} events exceed the {MAX_MESSAGE_BYTES}-byte message limit")
        await to_thread.run_sync(self.queue.send_batch, bodies)

    async def aclose(self) -> None:
        return None


class HttpSink:
    """POST batches to an edgepipe server's `/v1/events`.

    `transport` lets tests (and embedders) route requests in-process, e.g. to an
    `httpx.ASGITransport` over `create_app(env)`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.retries = retries
        self.backoff = backoff
        self.rejected = 0

    async def send(self, events: list[dict[str, Any]]) -> None:
        """Deliver one batch; raise TransientError when retries ran out, ValidationError when
        the server refused the body as a whole."""
        payload = orjson.dumps(events)
        for attempt in range(self.retries + 1):
            delay = self.backoff * 2**attempt * (0.5 + random.random())
            try:
                resp = await self.client.post("/v1/events", content=payload)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 202:
                    self.rejected += len(resp.json().get("rejected", []))
                    return
                failure = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUSES:
                    raise ValidationError("events", f"refused by the server: {failure}")
                delay = max(delay, _retry_after(resp))
            if attempt < self.retries:
                log.event("events_post_retry", logging.DEBUG, attempt=attempt + 1, error=failure)
                await asyncio.sleep(delay)
        raise TransientError(f"posting {len(events)} events failed after {self.retries + 1} attempts: {failure}")

    async def aclose(self) -> None:
        await self.client.aclose()


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(float(resp.headers.get("retry-after", 0)), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


__all__ = ["HttpSink", "QueueSink", "Sink"]
