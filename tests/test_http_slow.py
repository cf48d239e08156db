"""Slow and vanishing HTTP clients on POST /v1/events: a body that does not arrive within
`[http] body_timeout` answers 408 and enqueues nothing; a client that disconnects
mid-body is dropped quietly (no ASGI traceback) and enqueues nothing. Driven at the ASGI
level with a hand-written `receive`, and once through a real uvicorn server."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import orjson
import pytest

from pipeline import log
from pipeline.http import app as app_mod
from pipeline.http.app import create_app
from tests.http_support import depth, event, queued

pytestmark = pytest.mark.anyio

SAFETY_S = 30  # only so that a regression fails instead of hanging; no test waits this long


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog seeing every logger, "edgepipe" included even after `pipeline.log.setup()`
    stopped it propagating."""
    monkeypatch.setattr(log.logger, "propagate", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="edgepipe")
    return caplog


def _body() -> bytes:
    return orjson.dumps([event(i) for i in range(20)])


def _scope(length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
        "state": {},
    }


async def _call(app: Any, receive: Any, length: int) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(_scope(length), receive, send), SAFETY_S)
    return sent


def _response(sent: list[dict[str, Any]]) -> tuple[int, dict[bytes, bytes], bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), body


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_stalled_body_answers_408_and_enqueues_nothing(
    make_env: Any, sqlite_url: str, records: pytest.LogCaptureFixture
) -> None:
    env = make_env(sqlite_url, http={"body_timeout": 0.2})
    app = create_app(env)
    data = _body()
    never = asyncio.Event()
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": data[:100], "more_body": True}
        await never.wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    status, headers, body = _response(await _call(app, receive, len(data)))
    assert status == 408
    err = orjson.loads(body)
    assert err["error"] == "request_timeout" and "body_timeout" in err["detail"]
    assert headers.get(b"connection") == b"close"
    assert calls == 2  # it was waiting for the rest of the body when it gave up
    assert depth(env) == 0 and queued(env) == []
    assert not _tracebacks(records)
    metrics = app.state.metrics.render().decode()
    assert 'edgepipe_requests_refused_total{code="request_timeout"} 1.0' in metrics


async def test_a_body_within_the_timeout_is_accepted(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, http={"body_timeout": 30})
    app = create_app(env)
    data = _body()
    chunks = [data[i : i + 64] for i in range(0, len(data), 64)]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    status, _, body = _response(await _call(app, receive, len(data)))
    assert status == 202, body
    assert orjson.loads(body)["accepted"] == 20 and depth(env) == 1


async def test_a_client_that_disconnects_mid_body_is_dropped_quietly(
    make_env: Any, sqlite_url: str, records: pytest.LogCaptureFixture
) -> None:
    env = make_env(sqlite_url)
    app = create_app(env)
    data = _body()
    messages = [
        {"type": "http.request", "body": data[:100], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = await _call(app, receive, len(data))  # does not raise
    assert not messages
    assert all(m.get("status", 0) < 500 for m in sent)
    assert depth(env) == 0 and queued(env) == []
    assert not _tracebacks(records)
    lines = [r for r in records.records if r.getMessage().startswith("event=http_client_disconnect ")]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG and not lines[0].exc_info


def test_a_stalled_body_through_uvicorn_gets_408_and_the_connection_closed(
    make_env: Any, sqlite_url: str, records: pytest.LogCaptureFixture
) -> None:
    """The same through a real server: the 408 reaches the client and uvicorn then closes
    the connection (the rest of the body can never be read as a next request)."""
    import uvicorn

    env = make_env(sqlite_url, http={"body_timeout": 0.2})
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        create_app(env), log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=app_mod.KEEP_ALIVE_S
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        data = _body()
        head = (
            f"POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        ).encode()
        # The listener already listens: the connection waits in its backlog until uvicorn accepts.
        with socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S) as client:
            client.sendall(head + data[:100])
            received = b""
            while chunk := client.recv(65536):  # until uvicorn closes the connection
                received += chunk
    finally:
        server.should_exit = True
        thread.join(SAFETY_S)
        listener.close()
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), received
    assert b"connection: close" in rest.lower()
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert depth(env) == 0
    assert not _tracebacks(records)


def test_run_server_passes_the_keep_alive_timeout(make_env: Any, sqlite_url: str, monkeypatch: Any) -> None:
    import gc

    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    try:
        app_mod.run_server(create_app(make_env(sqlite_url)), "127.0.0.1", 8787)
    finally:
        gc.unfreeze()
    assert seen["timeout_keep_alive"] == 5 and seen["host"] == "127.0.0.1" and seen["port"] == 8787
