"""schemathesis fuzzing of POST /v1/events against the app's own OpenAPI document (offline,
in-process): no 5xx, responses conform to the document, and the queue grows by exactly
the number of accepted events — nothing is enqueued from a rejected body or event."""

from __future__ import annotations

import gzip
import json
from typing import Any

import anyio
import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pipeline.http.app import create_app
from pipeline.http.auth import create_token
from tests.http_support import client_for, queued_events

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture
def fuzz_target(make_env: Any, sqlite_url: str) -> tuple[Any, Any, str]:
    env = make_env(sqlite_url, http={"max_events_per_request": 50, "max_body_bytes": 64 * 1024})
    _, token = create_token(env.DB, "fuzz")
    return env, create_app(env), token


def _check_enqueued(env: Any, before: int, status: int, body: Any) -> None:
    after = len(queued_events(env))
    assert status < 500, body
    if status == 202:
        assert after - before == body["accepted"]
    else:
        assert after == before, f"{status} but {after - before} events enqueued"


def test_schemathesis_post_events(make_env: Any, sqlite_url: str) -> None:
    """On an open app (no token exists): schemathesis's negative mode may generate a case
    without its security header and drop the one passed to `call`, which would test
    authentication, not bodies (the scope matrix in test_scopes.py does that)."""
    env = make_env(sqlite_url, http={"max_events_per_request": 50, "max_body_bytes": 64 * 1024})
    app = create_app(env)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = schema["/v1/events"]["POST"]
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
        operation.as_strategy(GenerationMode.POSITIVE, media_type="application/x-ndjson"),
    )
    seen: set[int] = set()
    media: set[str] = set()

    @FUZZ
    @given(case=strategy)
    def run(case: Any) -> None:
        before = len(queued_events(env))
        response = case.call()
        body = response.json()
        _check_enqueued(env, before, response.status_code, body)
        seen.add(response.status_code)
        media.add(case.media_type)
        assert set(body) == ({"accepted", "rejected"} if response.status_code == 202 else {"error", "detail"})
        # Excluded: the app is open (no token), and an array holding invalid events is
        # accepted with per-event rejections by design (202), not refused as a whole.
        excluded = [schemathesis.checks.ignored_auth, schemathesis.checks.negative_data_rejection]
        case.validate_response(response, excluded_checks=excluded)

    run()
    assert 202 in seen and 400 in seen  # acceptable bodies and malformed ones were both produced
    assert media == {"application/json", "application/x-ndjson"}


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()  # stdlib: negative cases include integers beyond 64 bits


_valid = st.fixed_dictionaries(
    {
        "ts": st.integers(946_684_800_000, 1_700_000_000_000),
        "method": st.sampled_from(["GET", "post", "PUT"]),
        "path": st.from_regex(r"\A/[a-z0-9/]{0,30}\Z"),
        "status": st.integers(100, 599),
        "response_time_ms": st.floats(0, 1e6),
    }
)
_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_event = _valid | _valid.flatmap(lambda e: st.dictionaries(st.sampled_from(list(e)), _junk, max_size=2).map(e.__or__))


@given(
    events=st.lists(_event | _junk, max_size=60),
    form=st.sampled_from(["json", "ndjson", "gzip", "truncated", "bytes"]),
    noise=st.binary(max_size=64),
)
@FUZZ
def test_hypothesis_bodies_never_500_and_enqueue_only_accepted(
    fuzz_target: tuple[Any, Any, str], events: list[Any], form: str, noise: bytes
) -> None:
    """Mixed valid/invalid events and corrupted bodies in every accepted encoding."""
    env, app, token = fuzz_target
    data = orjson.dumps(events)
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    if form == "ndjson":
        data = b"\n".join(orjson.dumps(e) for e in events)
        headers["content-type"] = "application/x-ndjson"
    elif form == "gzip":
        data = gzip.compress(data)
        headers["content-encoding"] = "gzip"
    elif form == "truncated":
        data = data[: len(data) // 2]
    elif form == "bytes":
        data = noise
    before = len(queued_events(env))

    async def post() -> httpx.Response:
        async with client_for(app) as client:
            return await client.post("/v1/events", content=data, headers=headers)

    response = anyio.run(post)
    body = response.json()
    _check_enqueued(env, before, response.status_code, body)
    if response.status_code == 202:
        assert body["accepted"] + len(body["rejected"]) == len(events)
