"""POST /v1/events: acceptance, partial acceptance, every refusal code, limits, gzip
(and gzip bombs), array messages within the size limit, ids assigned at enqueue,
backpressure and auth — in-process over httpx's ASGI transport."""

from __future__ import annotations

import gzip
import logging
import math
import uuid
from typing import Any

import orjson
import pytest

from pipeline import queries
from pipeline.bindings.queue import MAX_MESSAGE_BYTES
from pipeline.http.app import create_app
from pipeline.http.auth import create_token, revoke_token
from tests.http_support import client_for, consume_all, depth, event, queued, queued_events

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app(env: Any) -> Any:
    return create_app(env)


async def test_json_array_is_enqueued_and_consumed(env: Any, app: Any) -> None:
    events = [event(i) for i in range(50)]
    async with client_for(app) as c:
        r = await c.post("/v1/events", json=events)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 50, "rejected": []}
    assert queued(env) == [events]  # one message: the request's events as one array
    consume_all(env)
    assert env.QUEUE.stats()["dlq"] == 0
    async with client_for(app) as c:
        rows = (await c.get("/v1/paths/hourly")).json()["rows"]
    assert sum(r["requests"] for r in rows) == 50


async def test_ndjson_with_partial_acceptance_names_fields(env: Any, app: Any) -> None:
    good = [event(0), event(3)]
    lines = [
        orjson.dumps(good[0]),
        orjson.dumps(event(1, status=999)),
        b"",
        b"{not json",
        orjson.dumps(event(2, response_time_ms=-1)),
        orjson.dumps(good[1]),
        orjson.dumps(event(4, path="no-slash")),
    ]
    async with client_for(app) as c:
        r = await c.post("/v1/events", content=b"\n".join(lines), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == 2
    assert [(x["index"], x["field"]) for x in body["rejected"]] == [
        (1, "status"),
        (2, "event"),
        (3, "response_time_ms"),
        (5, "path"),
    ]
    assert all(x["error"].startswith(x["field"]) for x in body["rejected"])
    assert queued(env) == [good]


async def test_gzip_body_is_accepted(env: Any, app: Any) -> None:
    events = [event(i) for i in range(10)]
    data = gzip.compress(orjson.dumps(events))
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    async with client_for(app) as c:
        r = await c.post("/v1/events", content=data, headers=headers)
    assert r.status_code == 202 and r.json()["accepted"] == 10
    assert queued(env) == [events]


async def test_multi_member_gzip_is_one_body(env: Any, app: Any) -> None:
    data = gzip.compress(b'[{"ts": 1, "method": "GET",') + gzip.compress(b'"path": "/", "status": 200}]')
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    async with client_for(app) as c:
        r = await c.post("/v1/events", content=data, headers=headers)
    assert r.status_code == 202
    assert r.json()["rejected"][0]["field"] == "response_time_ms"  # decoded fine; the event lacks a field


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"[1, 2", {"content-type": "application/json"}, 400, "malformed_body"),
        (b'{"ts": 1}', {"content-type": "application/json"}, 400, "malformed_body"),
        (b"[]", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (b"[]", {}, 415, "unsupported_media_type"),
        (b"[]", {"content-type": "application/json", "content-encoding": "br"}, 415, "unsupported_media_type"),
        (b"not gzip", {"content-type": "application/json", "content-encoding": "gzip"}, 400, "malformed_body"),
        (gzip.compress(b"[]")[:-6], {"content-type": "application/json", "content-encoding": "gzip"}, 400,
         "malformed_body"),
    ],
)  # fmt: skip
async def test_refused_bodies_enqueue_nothing(
    env: Any, app: Any, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    async with client_for(app) as c:
        r = await c.post("/v1/events", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]
    assert depth(env) == 0


async def test_limits(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, http={"max_events_per_request": 5, "max_body_bytes": 4096})
    app = create_app(env)
    ct = {"content-type": "application/json"}
    async with client_for(app) as c:
        too_many = await c.post("/v1/events", json=[event(i) for i in range(6)])
        ndjson = b"\n".join(orjson.dumps(event(i)) for i in range(6))
        too_many_lines = await c.post("/v1/events", content=ndjson, headers={"content-type": "application/x-ndjson"})
        big = await c.post("/v1/events", content=b"[" + b" " * 5000 + b"]", headers=ct)

        async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            for _ in range(10):
                yield b" " * 1000

        streamed = await c.post("/v1/events", content=chunks(), headers=ct)
        # A gzip bomb: ~4 KB on the wire, 4 MB decompressed.
        bomb = gzip.compress(b"[" + b" " * 4_000_000 + b"]", 9)
        assert len(bomb) < 4096
        bombed = await c.post("/v1/events", content=bomb, headers=ct | {"content-encoding": "gzip"})
        fits = [event(i) for i in range(5)]
        ok = await c.post("/v1/events", json=fits)
    for r in (too_many, too_many_lines, big, streamed, bombed):
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "payload_too_large"
    assert "max_events_per_request" in too_many.json()["detail"]
    assert "decompressed" in bombed.json()["detail"]
    assert ok.status_code == 202
    assert queued(env) == [fits]


async def test_a_large_request_is_split_into_messages_within_the_size_limit(env: Any, app: Any) -> None:
    events = [event(i, id=f"ev-{i:04d}", note="x" * 1000) for i in range(400)]
    size = len(orjson.dumps(events[0]))
    assert {len(orjson.dumps(e)) for e in events} == {size}  # all alike: the split is predictable
    per_message = (MAX_MESSAGE_BYTES - 1) // (size + 1)  # "[" + n events + (n - 1) "," + "]"
    async with client_for(app) as c:
        r = await c.post("/v1/events", json=events)
    assert r.json() == {"accepted": 400, "rejected": []}
    bodies = queued(env)
    assert len(bodies) == math.ceil(400 / per_message) > 1
    assert [len(b) for b in bodies[:-1]] == [per_message] * (len(bodies) - 1)
    assert all(len(orjson.dumps(b)) <= MAX_MESSAGE_BYTES for b in bodies)
    assert [e for b in bodies for e in b] == events
    consume_all(env)
    assert env.QUEUE.stats()["dlq"] == 0
    assert sum(r["requests"] for r in queries.hourly(env.DB)) == 400


async def test_an_event_too_large_for_a_message_is_rejected_alone(env: Any, app: Any) -> None:
    events = [event(0, status=999), event(1), event(2, note="x" * MAX_MESSAGE_BYTES), event(3)]
    async with client_for(app) as c:
        r = await c.post("/v1/events", json=events)
    assert r.status_code == 202
    assert r.json()["accepted"] == 2
    assert [(x["index"], x["field"]) for x in r.json()["rejected"]] == [(0, "status"), (2, "event")]
    assert "message limit" in r.json()["rejected"][1]["error"]
    assert queued(env) == [[events[1], events[3]]]


async def test_events_without_an_id_get_distinct_uuid7_ids_at_enqueue(env: Any, app: Any) -> None:
    events = [event(i) for i in range(6)]
    del events[0]["id"], events[1]["id"]
    events[2]["id"], events[3]["id"] = None, ""
    async with client_for(app) as c:
        first = await c.post("/v1/events", json=events)
        again = await c.post("/v1/events", json=events[:4])  # posted again: new events, new ids
    assert first.json()["accepted"] == 6 and again.json()["accepted"] == 4
    stored = queued_events(env)
    ids = [e["id"] for e in stored]
    assert ids[4:6] == ["ev-4", "ev-5"]
    fresh = ids[:4] + ids[6:]
    assert len(set(fresh)) == 8 and all(uuid.UUID(i).version == 7 for i in fresh)
    without_id = [{k: v for k, v in e.items() if k != "id"} for e in events + events[:4]]
    assert [{k: v for k, v in e.items() if k != "id"} for e in stored] == without_id
    consume_all(env)
    assert sum(r["requests"] for r in queries.hourly(env.DB)) == 10


async def test_backpressure_503_with_retry_after(make_env: Any, sqlite_url: str) -> None:
    """`max_queue_depth` counts messages: each request is one here, whatever its size."""
    env = make_env(sqlite_url, http={"max_queue_depth": 2, "depth_check_interval": 0})
    app = create_app(env)
    async with client_for(app) as c:
        first = [await c.post("/v1/events", json=[event(10 * k + i) for i in range(5)]) for k in range(3)]
        refused = await c.post("/v1/events", json=[event(99)])
        consume_all(env)
        again = await c.post("/v1/events", json=[event(100)])
    assert [r.status_code for r in first] == [202, 202, 202]
    assert refused.status_code == 503
    assert refused.json()["error"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert again.status_code == 202
    assert depth(env) == 1


async def test_backpressure_counts_the_queue_when_its_span_has_gaps(make_env: Any, sqlite_url: str) -> None:
    """Messages held back by a retry leave a span of sequence numbers wider than the queue:
    the cheap upper bound says "over the limit", the count says otherwise, and wins."""
    env = make_env(sqlite_url, http={"max_queue_depth": 3, "depth_check_interval": 0})
    env.QUEUE.send_batch([event(i) for i in range(5)])
    batch = env.QUEUE.receive(5)
    for i, message in enumerate(batch):
        if i in (0, 4):
            message.retry(600)
        else:
            message.ack()
    env.QUEUE.settle(batch)
    assert depth(env) == 2
    app = create_app(env)
    async with client_for(app) as c:
        fits = await c.post("/v1/events", json=[event(10)])
        full = await c.post("/v1/events", json=[event(11)])
        refused = await c.post("/v1/events", json=[event(12)])
    assert fits.status_code == full.status_code == 202
    assert refused.status_code == 503 and refused.json()["error"] == "queue_full"
    assert depth(env) == 4


async def test_auth_tokens(env: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    open_app = create_app(env)
    async with client_for(open_app) as c:
        assert (await c.post("/v1/events", json=[event(0)])).status_code == 202  # loopback dev: open

    token_id, token = create_token(env.DB, "gateway", "ingest")
    app = create_app(env)
    async with client_for(app) as c:
        none = await c.post("/v1/events", json=[event(1)])
        wrong = await c.post("/v1/events", json=[event(2)], headers={"authorization": "Bearer ep_wrong"})
        basic = await c.get("/v1/stats", headers={"authorization": f"Basic {token}"})
        health = await c.get("/health")
    async with client_for(app, token) as c:
        good = await c.post("/v1/events", json=[event(3)])
        read = await c.get("/v1/stats")  # an ingest token may not read
    for r in (none, wrong, basic):
        assert r.status_code == 401
        assert r.json() == {"error": "unauthorized", "detail": "missing or invalid bearer token"}
        assert r.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200
    assert good.status_code == 202 and read.status_code == 403 and read.json()["error"] == "forbidden"
    assert depth(env) == 2

    _, other = create_token(env.DB, "dashboard", "read")
    revoke_token(env.DB, token_id)
    app = create_app(env)  # a fresh app reads the token set at once (a running one within seconds)
    async with client_for(app, token) as c:
        assert (await c.post("/v1/events", json=[event(4)])).status_code == 401  # revoked
        assert (await c.get("/v1/stats", headers={"authorization": f"Bearer {other}"})).status_code == 200
    assert depth(env) == 2
    assert token not in caplog.text and other not in caplog.text


async def test_revoking_every_token_opens_a_loopback_server_again(env: Any) -> None:
    token_id, token = create_token(env.DB, "only")
    revoke_token(env.DB, token_id)
    async with client_for(create_app(env), token) as c:
        assert (await c.post("/v1/events", json=[event(0)])).status_code == 202  # no token left: open again
    create_token(env.DB, "expired", expires_at=1.0)  # an expired token still closes it
    async with client_for(create_app(env)) as c:
        assert (await c.post("/v1/events", json=[event(1)])).status_code == 401
    assert depth(env) == 1


async def test_require_token_without_tokens_refuses_everything(env: Any) -> None:
    app = create_app(env, require_token=True)
    async with client_for(app) as c:
        assert (await c.post("/v1/events", json=[event(0)])).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/health")).status_code == 200
    assert depth(env) == 0


async def test_queue_failure_is_503_and_nothing_half_done(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    app = create_app(env)
    env.DB.dispose()
    import sqlalchemy as sa

    with env.DB.transaction() as conn:
        conn.execute(sa.text("DROP TABLE queue_messages"))
    async with client_for(app) as c:
        r = await c.post("/v1/events", json=[event(0)])
    assert r.status_code == 503
    assert r.json()["error"] == "binding_error"


async def test_unknown_route_and_method_use_the_error_shape(app: Any) -> None:
    async with client_for(app) as c:
        missing = await c.get("/v1/nope")
        wrong = await c.delete("/v1/events")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


def test_token_checker_records_last_use_and_sees_revocation(make_env: Any, sqlite_url: str) -> None:
    from pipeline.http.auth import TokenChecker, is_loopback, list_tokens

    env = make_env(sqlite_url)
    token_id, token = create_token(env.DB, "ci")
    checker = TokenChecker(env.DB, cache_seconds=0)
    checker.refresh()
    assert checker.required() and checker.check(f"Bearer {token}").ok
    assert checker.check(f"Bearer {token}x").denial == "unknown"
    assert list_tokens(env.DB)[0]["last_used_at"] is None  # written on the next refresh, not per request
    checker.refresh()
    assert list_tokens(env.DB)[0]["last_used_at"] is not None
    revoke_token(env.DB, token_id)
    checker.refresh()
    assert not checker.required() and checker.check(f"Bearer {token}").denial == "revoked"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1", "::")] == [
        True, True, True, True, False, False, False
    ]  # fmt: skip
