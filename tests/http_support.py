"""Shared pieces of the HTTP tests: an in-process client over `create_app`, event makers,
what the queue holds, driving an ASGI app's lifespan without a server, and a real
`edgepipe serve` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.env import Env
from pipeline.schema import queue_messages
from pipeline.worker import Worker


def event(i: int, **over: Any) -> dict[str, Any]:
    base = {
        "id": f"ev-{i}",
        "ts": clock.now_ms() - 60_000 - i,
        "method": "GET",
        "path": f"/items/{i % 7}",
        "status": 200,
        "response_time_ms": 12.5,
        "host": "api.example.com",
        "bytes": 100,
    }
    return base | over


@contextlib.asynccontextmanager
async def client_for(app: Any, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


def consume_all(env: Env) -> None:
    Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)


def depth(env: Env) -> int:
    return env.QUEUE.depth()


def queued(env: Env) -> list[Any]:
    """The queue's message bodies as stored, oldest first (JSON-decoded)."""
    q = queue_messages
    with env.DB.read() as conn:
        return [orjson.loads(b) for b in conn.execute(sa.select(q.c.body).order_by(q.c.seq)).scalars()]


def queued_events(env: Env) -> list[dict[str, Any]]:
    """The events of every queued array body, in order."""
    return [e for body in queued(env) for e in body]


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the ASGI lifespan protocol (startup, then shutdown on exit) like a server does."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await to_app.get()

    async def send(message: dict[str, Any]) -> None:
        await from_app.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    await to_app.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(from_app.get(), 10)
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        done = await asyncio.wait_for(from_app.get(), 30)
        assert done["type"] == "lifespan.shutdown.complete", done
        await asyncio.wait_for(task, 10)


SERVE_DEADLINE_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edgepipe_cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--config", str(cfg), *args]


@contextlib.contextmanager
def serving(cfg: Path, base: str, *args: str, client: httpx.Client | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`edgepipe serve ARGS` in a subprocess, yielded once `base`/health answers 200 (polled
    with a deadline, `client` for the requests); terminated on exit. Its output goes to
    serve.log beside `cfg`, shown when it exits early."""
    log_path = cfg.parent / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(edgepipe_cmd(cfg, "serve", *args), stdout=log, stderr=log)
        try:
            with contextlib.nullcontext(client) if client else httpx.Client(timeout=1) as poller:
                _wait_healthy(proc, base, poller, log_path)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, client: httpx.Client, log_path: Path) -> None:
    deadline = clock.monotonic() + SERVE_DEADLINE_S
    while True:
        try:
            if client.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert clock.monotonic() < deadline, "server did not become healthy"
        with contextlib.suppress(subprocess.TimeoutExpired):  # the poll interval, and a liveness check
            proc.wait(timeout=0.05)
            raise AssertionError(f"serve exited: {log_path.read_text()}")
