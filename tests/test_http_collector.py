"""The ASGI traffic collector on a small FastAPI app: N requests → exactly N events with
route templates (into a real queue, then through the consumer); a full buffer drops and
counts instead of blocking; flush on lifespan shutdown; sampling and exclusions; delivery
over HTTP to an edgepipe app, with retries."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, HTTPException

from pipeline import queries
from pipeline.bindings.queue import MAX_MESSAGE_BYTES
from pipeline.errors import MessageTooLarge
from pipeline.http import CollectorStats, HttpSink, QueueSink, TrafficCollector
from pipeline.http.app import create_app
from tests.http_support import client_for, consume_all, event, lifespan, queued

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def small_app(**collector: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    @app.post("/orders/{order_id}/items")
    async def add_item(order_id: str) -> dict[str, str]:
        return {"order": order_id}

    @app.get("/boom")
    async def boom() -> None:
        raise HTTPException(503, "down")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(TrafficCollector, **collector)
    return app


async def test_n_requests_make_exactly_n_events_with_route_templates(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    stats = CollectorStats()
    app = small_app(queue=env.QUEUE, stats=stats, batch_size=7, host="shop.example")
    async with lifespan(app), client_for(app) as c:
        for i in range(40):
            assert (await c.get(f"/users/{i}")).status_code == 200
        for i in range(15):
            assert (await c.post(f"/orders/A{i}/items")).status_code == 200
        for _ in range(5):
            assert (await c.get("/boom")).status_code == 503
        for i in range(3):
            assert (await c.get(f"/nowhere/{i}/")).status_code == 404
        for _ in range(4):
            await c.get("/health")  # excluded by default
    # Shutdown flushed everything that was buffered.
    assert stats.recorded == stats.sent == 63 and stats.dropped == stats.failed == 0
    bodies = queued(env)  # a batch is one array message
    assert sum(len(b) for b in bodies) == 63 and all(1 <= len(b) <= 7 for b in bodies)
    assert env.QUEUE.depth() == len(bodies)
    consume_all(env)
    assert env.QUEUE.stats()["dlq"] == 0
    rows = Counter()
    for r in queries.hourly(env.DB):
        assert r["host"] == "shop.example"
        rows[(r["method"], r["path"])] += r["requests"]
        if r["path"] == "/boom":
            assert r["status_5xx"] == r["requests"] == 5
    assert rows == {
        ("GET", "/users/{user_id}"): 40,
        ("POST", "/orders/{order_id}/items"): 15,
        ("GET", "/boom"): 5,
        ("GET", "/nowhere/:id"): 3,  # no route: the normalised path
    }


class GatedSink:
    """A sink that blocks until released: the collector's consumer side is stuck."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list[dict[str, Any]] = []

    async def send(self, events: list[dict[str, Any]]) -> None:
        await self.release.wait()
        self.received.extend(events)

    async def aclose(self) -> None:
        return None


async def test_full_buffer_drops_and_counts_instead_of_blocking() -> None:
    sink = GatedSink()
    stats = CollectorStats()
    app = small_app(sink=sink, stats=stats, buffer_size=10, batch_size=4, flush_interval=0.01)
    async with client_for(app) as c:
        # The sink never returns, yet every request completes promptly.
        async with asyncio.timeout(10):
            for i in range(50):
                assert (await c.get(f"/users/{i}")).status_code == 200
        # The buffer holds 10; the flusher may hold one more batch of 4 in hand (when it got
        # scheduled between requests). Everything else was dropped and counted.
        assert stats.recorded + stats.dropped == 50
        assert 10 <= stats.recorded <= 14 and stats.dropped >= 36
        sink.release.set()
        app_collector = _collector(app)
        await app_collector.flush()
    assert len(sink.received) == stats.sent == stats.recorded


async def test_sampling_and_exclusions(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    stats = CollectorStats()
    none = small_app(queue=env.QUEUE, stats=stats, sample_rate=0.0)
    async with lifespan(none), client_for(none) as c:
        for i in range(20):
            await c.get(f"/users/{i}")
    assert stats.recorded == 0
    stats = CollectorStats()
    custom = small_app(queue=env.QUEUE, stats=stats, exclude=["/users"])
    async with lifespan(custom), client_for(custom) as c:
        await c.get("/users/1")
        await c.get("/health")
        await c.post("/orders/1/items")
    assert stats.recorded == 2
    with pytest.raises(ValueError, match="sample_rate"):
        TrafficCollector(none, queue=env.QUEUE, sample_rate=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        TrafficCollector(none)


async def test_collector_posts_to_edgepipe_over_http_with_retries(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    server = create_app(env)
    inner = httpx.ASGITransport(app=server)
    failures = {"left": 2}

    class Flaky(httpx.AsyncBaseTransport):
        """The network drops the first two attempts, then behaves."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if failures["left"]:
                failures["left"] -= 1
                raise httpx.ConnectError("connection refused")
            return await inner.handle_async_request(request)

    sink = HttpSink("http://edgepipe", backoff=0.001, transport=Flaky())
    stats = CollectorStats()
    app = small_app(sink=sink, stats=stats, batch_size=100)
    async with lifespan(app), client_for(app) as c:
        for i in range(25):
            await c.get(f"/users/{i}")
    assert failures["left"] == 0
    assert stats.sent == 25 and stats.failed == 0
    consume_all(env)
    rows = list(queries.hourly(env.DB))
    assert [(r["path"], r["requests"]) for r in rows] == [("/users/{user_id}", 25)]


async def test_queue_sink_splits_a_batch_at_the_message_size_limit(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    sink = QueueSink(env.QUEUE)
    events = [event(i, path=f"/long/{'p' * 400}/{i}") for i in range(500)]  # ~600 bytes each
    await sink.send(events)
    bodies = queued(env)
    assert len(bodies) == 3 and [e for b in bodies for e in b] == events
    assert all(len(orjson.dumps(b)) <= MAX_MESSAGE_BYTES for b in bodies)
    with pytest.raises(MessageTooLarge):
        await sink.send([event(0), event(1, note="x" * MAX_MESSAGE_BYTES)])
    assert len(queued(env)) == 3  # nothing of the refused batch
    consume_all(env)
    assert sum(r["requests"] for r in queries.hourly(env.DB)) == 500


async def test_http_sink_gives_up_on_a_refusal(make_env: Any, sqlite_url: str) -> None:
    from pipeline.errors import ValidationError
    from pipeline.http.auth import create_token

    env = make_env(sqlite_url)
    create_token(env.DB)
    sink = HttpSink("http://edgepipe", token="ep_not-the-token", transport=httpx.ASGITransport(app=create_app(env)))
    with pytest.raises(ValidationError, match="HTTP 401"):
        await sink.send([{"ts": 1}])
    await sink.aclose()
    assert env.QUEUE.depth() == 0


def _collector(app: FastAPI) -> TrafficCollector:
    """The middleware instance Starlette built for `app`."""
    node = app.middleware_stack
    while node is not None and not isinstance(node, TrafficCollector):
        node = getattr(node, "app", None)
    assert node is not None
    return node


class ListSink:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def send(self, events: list[dict[str, Any]]) -> None:
        self.received.extend(events)

    async def aclose(self) -> None:
        return None


async def test_event_fields_host_time_and_size() -> None:
    """The host comes from the Host header (lower case, no port; IPv6 kept in brackets), else
    the server's name; ts is the request's start on the wall clock; bytes is the body size."""
    from pipeline import clock

    sink = ListSink()
    app = small_app(sink=sink)
    before = clock.now_ms()
    async with client_for(app) as c:
        await c.get("/users/1", headers={"host": "Shop.Example:8443"})
        await c.get("/users/2", headers={"host": "[::1]:8000"})
        await c.get("/users/3", headers={"host": "shop.example"})
    collector = _collector(app)

    async def no_host_header(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"de"})

    raw = TrafficCollector(no_host_header, sink=sink)
    scope = {"type": "http", "method": "PUT", "path": "/x/42", "headers": [], "server": ("10.0.0.5", 80)}
    await raw(scope, None, _discard)  # type: ignore[arg-type]
    await collector.flush()
    await raw.flush()
    after = clock.now_ms()
    got = [(e["method"], e["path"], e["host"], e["status"], e["bytes"]) for e in sink.received]
    assert got == [
        ("GET", "/users/{user_id}", "shop.example", 200, len(b'{"id":1}')),
        ("GET", "/users/{user_id}", "[::1]", 200, len(b'{"id":2}')),
        ("GET", "/users/{user_id}", "shop.example", 200, len(b'{"id":3}')),
        ("PUT", "/x/:id", "10.0.0.5", 204, 5),
    ]
    # Whole milliseconds, truncated: ts (the monotonic start shifted by the wall clock's
    # offset, itself truncated) and the span before..after are each exact to within 1 ms.
    assert all(before - 1 <= e["ts"] <= after and 0 <= e["response_time_ms"] <= after - before + 1
               for e in sink.received)  # fmt: skip
    assert len({e["id"] for e in sink.received}) == 4


async def _discard(message: Any) -> None:
    return None


async def test_a_path_with_nul_is_recorded_percent_encoded_and_stored(make_env: Any, sqlite_url: str) -> None:
    """A request for `/files/a%00b` reaches the app decoded, with a NUL that no backend can
    store: the collector records it percent-encoded, so the consumer stores the event."""
    env = make_env(sqlite_url)
    stats = CollectorStats()
    app = small_app(queue=env.QUEUE, stats=stats)
    async with lifespan(app), client_for(app) as c:
        await c.get("/files/a%00b")
        await c.get("/files/plain")
    consume_all(env)
    assert env.QUEUE.stats()["dlq"] == 0
    assert {r["path"] for r in queries.hourly(env.DB)} == {"/files/a%00b", "/files/plain"}


def test_storable_encodes_only_what_cannot_be_stored() -> None:
    from pipeline.events import storable

    assert storable("/plain/ü") == "/plain/ü"
    assert storable("/a\x00b") == "/a%00b"
    assert storable("/s\ud800") == "/s%ED%A0%80"
