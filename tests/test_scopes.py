"""Who may call what: every route of the app × every kind of caller → 401 / 403 / 2xx as the
README documents; expiry on a frozen clock; per-caller rate limits on an injected clock
(429, nothing enqueued, then recovery); failed authentication audited and rate-limited;
the counters on /metrics. In-process over httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from freezegun import freeze_time

from pipeline import audit, clock
from pipeline.cli.report import pipeline_document
from pipeline.errors import ValidationError
from pipeline.http.access import app_routes
from pipeline.http.app import create_app
from pipeline.http.auth import create_token, parse_duration, revoke_token
from pipeline.schema import worker_heartbeats
from tests.http_support import client_for, depth, event

pytestmark = pytest.mark.anyio

# The documented matrix: the scope each route needs (None: open to anyone). Written out
# here, not read from the app, so a route whose guard changes or goes missing fails.
EXPECTED: dict[tuple[str, str], str | None] = {
    ("POST", "/v1/events"): "ingest",
    ("GET", "/v1/events"): "read",  # the hot detail rows (drill-down)
    ("GET", "/v1/paths/top"): "read",
    ("GET", "/v1/paths/hourly"): "read",
    ("GET", "/v1/paths/daily"): "read",
    ("GET", "/v1/stats"): "read",
    ("GET", "/v1/jobs"): "read",
    ("GET", "/v1/archive/objects"): "read",
    ("GET", "/v1/audit"): "admin",
    ("GET", "/metrics"): "read",
    ("GET", "/health"): None,
    ("GET", "/ready"): None,
    ("GET", "/openapi.json"): None,
    ("GET", "/docs"): None,
    ("GET", "/docs/oauth2-redirect"): None,
    ("GET", "/redoc"): None,
    ("GET", "/v1/quality"): "read",
    ("GET", "/v1/overview"): "read",
    ("GET", "/v1/pipeline"): "read",
    ("GET", "/"): None,  # redirects to the dashboard
    ("GET", "/dashboard"): None,  # a static page: its data calls need a token
    ("GET", "/dashboard/assets/{name:path}"): None,
}
SAMPLE_PATHS = {"/dashboard/assets/{name:path}": "/dashboard/assets/app.js"}  # a concrete URL of a templated route
GRANTED = {"ingest": {"ingest"}, "read": {"read"}, "admin": {"ingest", "read", "admin"}}
CALLERS = ("none", "malformed", "unknown", "revoked", "expired", "ingest", "read", "admin")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _routes(app: Any) -> set[tuple[str, str]]:
    return {(m, r.path) for r in app_routes(app) for m in (r.methods or ()) if m != "HEAD"}


def _heartbeat(env: Any) -> None:
    now = clock.now_s()
    with env.DB.transaction() as conn:
        conn.execute(worker_heartbeats.insert().values(holder="w", host="h", pid=1, state="running",
                                                       started_at=now, last_seen_at=now))  # fmt: skip


def _tokens(env: Any) -> dict[str, str | None]:
    """An Authorization header per kind of caller."""
    headers: dict[str, str | None] = {"none": None, "malformed": "Basic dXNlcjpwYXNz", "unknown": "Bearer ep_nope"}
    for scope in ("ingest", "read", "admin"):
        headers[scope] = f"Bearer {create_token(env.DB, f'{scope}-token', scope)[1]}"
    revoked_id, revoked = create_token(env.DB, "gone", "admin")
    revoke_token(env.DB, revoked_id)
    headers["revoked"] = f"Bearer {revoked}"
    headers["expired"] = f"Bearer {create_token(env.DB, 'old', 'admin', expires_at=clock.now_s() - 1)[1]}"
    return headers


async def _call(c: httpx.AsyncClient, method: str, path: str, authorization: str | None, i: int) -> httpx.Response:
    headers = {"authorization": authorization} if authorization else {}
    if method == "POST":
        return await c.post(path, json=[event(i)], headers=headers)
    return await c.get(SAMPLE_PATHS.get(path, path), headers=headers, follow_redirects=True)


def _app(env: Any, **options: Any) -> Any:
    """The app as `edgepipe serve` composes it (with the pipeline report)."""
    return create_app(env, pipeline_report=pipeline_document, **options)


def _expected_status(scope: str | None, caller: str) -> int | str:
    if scope is None:
        return "2xx"
    if caller not in GRANTED:
        return 401
    return "2xx" if scope in GRANTED[caller] else 403


async def test_every_route_is_in_the_documented_matrix(env: Any) -> None:
    app = create_app(env)
    assert _routes(app) == set(EXPECTED)
    async with client_for(app) as c:
        doc = (await c.get("/openapi.json")).json()
    documented = {(m.upper(), p): op.get("x-scope") for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(documented) <= set(EXPECTED)  # nothing served that the enumeration above missed
    assert documented == {k: v for k, v in EXPECTED.items() if k in documented}


async def test_scope_matrix_every_route_every_caller(env: Any) -> None:
    headers = _tokens(env)
    _heartbeat(env)
    app = _app(env)
    got: dict[tuple[str, str, str], int | str] = {}
    want: dict[tuple[str, str, str], int | str] = {}
    i = 0
    async with client_for(app) as c:
        for method, path in sorted(_routes(app)):
            for caller in CALLERS:
                i += 1
                r = await _call(c, method, path, headers[caller], i)
                got[(method, path, caller)] = "2xx" if 200 <= r.status_code < 300 else r.status_code
                want[(method, path, caller)] = _expected_status(EXPECTED[(method, path)], caller)
                if r.status_code in (401, 403):
                    assert r.json()["error"] == ("unauthorized" if r.status_code == 401 else "forbidden")
                    assert r.headers["www-authenticate"].startswith("Bearer")
    assert got == want
    assert depth(env) == len([k for k in got if k[0] == "POST" and got[k] == "2xx"]) == 2  # ingest and admin


async def test_open_on_loopback_without_tokens_and_closed_when_required(env: Any) -> None:
    _heartbeat(env)
    open_app, closed_app = _app(env), _app(env, require_token=True)
    async with client_for(open_app) as c:
        statuses = {route: (await _call(c, *route, None, n)).status_code for n, route in enumerate(EXPECTED)}
    assert all(200 <= s < 300 for s in statuses.values()), statuses
    async with client_for(closed_app) as c:
        for n, (method, path) in enumerate(EXPECTED):
            r = await _call(c, method, path, "Bearer ep_anything", n)
            assert r.status_code == (401 if EXPECTED[(method, path)] else 200), (method, path)


async def test_an_expired_token_is_refused_on_a_frozen_clock(env: Any) -> None:
    with freeze_time("2026-11-19T12:00:00Z", real_asyncio=True) as frozen:
        token_id, token = create_token(env.DB, "short", "read", expires_at=clock.now_s() + parse_duration("1h"))
        app = create_app(env)
        async with client_for(app, token) as c:
            frozen.move_to("2026-11-19T12:59:59Z")
            before = await c.get("/v1/stats")
            frozen.move_to("2026-11-19T13:00:00Z")
            after = await c.get("/v1/stats")
    assert before.status_code == 200
    assert after.status_code == 401 and after.json()["detail"] == "bearer token expired"
    rows = audit.entries(env.DB, action_name="auth.failed")
    assert [(r["actor"], r["outcome"], r["params"]["reason"]) for r in rows] == [
        (f"token:{token_id}:short", "denied", "expired")
    ]


async def test_rate_limit_429_nothing_enqueued_then_recovery(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, http={"rate_limit_per_s": 0.5, "burst": 2})
    _, token = create_token(env.DB, "gw", "ingest")
    _, other = create_token(env.DB, "other", "admin")
    app = create_app(env)
    now = [1000.0]
    app.state.limiter.now = lambda: now[0]
    assert (app.state.limiter.rate, app.state.limiter.burst) == (0.5, 2)
    async with client_for(app, token) as c:
        first = [(await c.post("/v1/events", json=[event(i)])).status_code for i in range(2)]
        limited = await c.post("/v1/events", json=[event(2)])
        queued_before = depth(env)
        elsewhere = await c.get("/v1/stats", headers={"authorization": f"Bearer {other}"})  # its own bucket
        health = await c.get("/health")  # never limited
        now[0] += 1.5
        still = await c.post("/v1/events", json=[event(3)])
        now[0] += 0.5  # 2 s after the refusal: one request's worth is back
        recovered = await c.post("/v1/events", json=[event(4)])
        metrics = (await c.get("/metrics", headers={"authorization": f"Bearer {other}"})).text
    assert first == [202, 202]
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert limited.headers["retry-after"] == "2"
    assert queued_before == 2  # the refused request enqueued nothing
    assert elsewhere.status_code == 200 and health.status_code == 200
    assert still.status_code == 429 and still.headers["retry-after"] == "1"
    assert recovered.status_code == 202 and depth(env) == 3
    assert "edgepipe_http_rate_limited_total 2.0" in metrics


async def test_open_api_is_rate_limited_per_client_address(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, http={"rate_limit_per_s": 1, "burst": 1})
    app = create_app(env)
    app.state.limiter.now = lambda: 50.0

    @asynccontextmanager
    async def from_address(host: str) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client

    async with from_address("10.0.0.1") as a, from_address("10.0.0.2") as b:
        assert [(await a.get("/v1/stats")).status_code for _ in range(2)] == [200, 429]
        assert (await b.get("/v1/stats")).status_code == 200


async def test_failed_auth_is_audited_once_each_and_rate_limited(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    _, token = create_token(env.DB, "real", "admin")
    app = create_app(env)
    per_minute = audit.FAILED_AUTH_PER_MINUTE
    with freeze_time("2026-11-19T12:00:05Z", real_asyncio=True) as frozen:
        async with client_for(app) as c:
            for i in range(per_minute + 3):
                bad = {"authorization": f"Bearer ep_guess{i}"} if i % 2 else {}
                assert (await c.get("/v1/stats", headers=bad)).status_code == 401
            assert len(audit.entries(env.DB, action_name="auth.failed")) == per_minute
            frozen.move_to("2026-11-19T12:01:00Z")
            assert (await c.post("/v1/events", json=[event(0)])).status_code == 401
            metrics = (await c.get("/metrics", headers={"authorization": f"Bearer {token}"})).text
    rows = audit.entries(env.DB, action_name="auth.failed")
    assert len(rows) == per_minute + 1
    assert {(r["actor"], r["outcome"], r["client"], r["token_id"]) for r in rows} == {
        ("anonymous", "denied", "127.0.0.1", None)
    }
    assert [r["params"]["reason"] for r in rows[:2]] == ["missing", "unknown"]
    assert rows[0]["params"] == {"reason": "missing", "method": "GET", "path": "/v1/stats"}
    assert rows[-1]["params"] == {"reason": "missing", "method": "POST", "path": "/v1/events", "suppressed": 3}
    assert all("ep_" not in str(r) for r in audit.entries(env.DB))  # never a token, not even a wrong one
    assert 'edgepipe_http_auth_failures_total{reason="missing"}' in metrics
    failures = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("edgepipe_http_auth_failures_total{")
    )
    assert failures == per_minute + 4


async def test_forbidden_is_counted_not_audited(env: Any) -> None:
    _, token = create_token(env.DB, "feeder", "ingest")
    app = create_app(env)
    async with client_for(app, token) as c:
        r = await c.get("/v1/audit")
    assert r.status_code == 403
    assert r.json()["detail"] == "this token's scope (ingest) does not allow this request (needs admin)"
    assert r.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert app.state.metrics.registry.get_sample_value("edgepipe_http_auth_failures_total", {"reason": "scope"}) == 1
    assert audit.entries(env.DB) == []


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90d", "12h", "30m", "3600s", " 1D ")] == [
        90 * 86_400, 12 * 3600, 30 * 60, 3600, 86_400
    ]  # fmt: skip
    for bad in ("", "90", "d", "1.5h", "-1d", "0s", "1w", "90 d", "36501000d"):
        with pytest.raises(ValidationError, match="expires-in"):
            parse_duration(bad)
