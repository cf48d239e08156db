"""Who may call what: authentication, scopes, per-caller rate limits, failed-auth audit.

Every route but `/health`, `/ready`, the OpenAPI pages and the dashboard's static page and
assets (`/`, `/dashboard`, `/dashboard/assets/…`: they hold no data) needs a scope (`Guard(scope)` as
a dependency, or `authorize(request, scope)` called by the route itself):

- no usable token at all, while tokens are required: 401, and an `auth.failed` audit row
  (outcome `denied`, the client's address and the reason; never the token), at most
  `FAILED_AUTH_PER_MINUTE` rows a minute per process;
- a valid token whose scope does not grant the route's: 403;
- over the caller's rate limit: 429 with `Retry-After`, before the route does anything.

When the API is open (no token exists and the server is on a loopback address) every
request passes, rate-limited per client address.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

from anyio import to_thread
from fastapi import Depends, FastAPI, Request, routing
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline import audit, log
from pipeline.http.auth import Denial, Scope, Token, TokenChecker, allows
from pipeline.http.errors import ApiError
from pipeline.http.metrics import Metrics
from pipeline.http.ratelimit import RateLimiter

ANONYMOUS = "anonymous"  # the audit actor of a request without a recognised token
MAX_PATH = 200

_bearer = HTTPBearer(auto_error=False, description="An API token from `edgepipe tokens create`")
# OpenAPI, for routes that call `authorize` themselves
BEARER: dict[str, list[dict[str, list[str]]]] = {"security": [{_bearer.scheme_name: []}]}
SCOPE_KEY = "x-scope"  # the OpenAPI extension naming the scope an operation needs


def client_address(request: Request) -> str | None:
    """The client's address: the peer's, or the one a trusted proxy forwarded
    (`[http] proxy_headers`, `forwarded_allow_ips`)."""
    return request.client.host[:64] if request.client else None


async def authorize(request: Request, scope: Scope) -> None:
    """Let the request through, or raise the 401 / 403 / 429 that stops it."""
    state = request.app.state
    checker: TokenChecker = state.tokens
    if checker.stale():
        await to_thread.run_sync(checker.refresh)
    client = client_address(request)
    if checker.required():
        verdict = checker.check(request.headers.get("authorization"))
        token = verdict.token
        if verdict.denial is not None or token is None:
            await _refuse_unauthenticated(request, verdict.denial or Denial.UNKNOWN, token, client)
        if not allows(token.scope, scope):
            state.metrics.auth_failures.labels("scope").inc()
            raise ApiError(
                403,
                "forbidden",
                f"this token's scope ({token.scope}) does not allow this request (needs {scope.value})",
                {"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        key = f"token:{token.id}"
    else:
        key = f"client:{client}"
    limiter: RateLimiter = state.limiter
    wait = limiter.take(key)
    if wait is not None:
        state.metrics.rate_limited.inc()
        raise ApiError(
            429,
            "rate_limited",
            f"over the rate limit of {limiter.rate:g} requests/s (bursts of {limiter.burst})",
            {"Retry-After": str(wait)},
        )


async def _refuse_unauthenticated(
    request: Request, denial: Denial, token: Token | None, client: str | None
) -> NoReturn:
    """Count and audit (rate-limited) a failed authentication, then raise its 401."""
    metrics: Metrics = request.app.state.metrics
    metrics.auth_failures.labels(denial.value).inc()
    suppressed = request.app.state.failed_auth.admit()
    if suppressed is not None:
        actor = audit.token_actor(token.id, token.name, client) if token else audit.Actor(ANONYMOUS, None, client)
        params = {"reason": denial.value, "method": request.method, "path": request.url.path[:MAX_PATH]}
        if suppressed:
            params["suppressed"] = suppressed
        try:
            await to_thread.run_sync(_record_failure, request.app.state.env.DB, actor, params, denial.value)
        except Exception as exc:  # the refusal must not depend on the audit's database
            log.event("audit_write_failed", logging.WARNING, action="auth.failed", error=f"{type(exc).__name__}: {exc}")
    detail = "bearer token expired" if denial is Denial.EXPIRED else "missing or invalid bearer token"
    raise ApiError(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})


def _record_failure(db: Any, actor: audit.Actor, params: dict[str, Any], reason: str) -> None:
    with db.transaction() as conn:
        audit.record(db, conn, actor, "auth.failed", params, audit.Outcome.DENIED, reason)


class Guard:
    """A route's access rule as a FastAPI dependency (which also documents the bearer
    scheme in OpenAPI): `dependencies=[Depends(Guard(Scope.READ))]`."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(
        self, request: Request, _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        await authorize(request, self.scope)


def app_routes(app: FastAPI) -> Iterator[Any]:
    """Every route `app` serves, with its full path, methods and dependencies, those of
    included routers too (recent FastAPI versions keep an included router as one entry of
    `app.routes`, flattened by `iter_route_contexts`)."""
    flatten = getattr(routing, "iter_route_contexts", None)
    return iter(flatten(app.routes)) if flatten is not None else iter(app.routes)


def route_scope(route: Any) -> Scope | None:
    """The scope a route (an `app_routes` item) needs: its `Guard`'s, or the `x-scope` it
    declares because it calls `authorize` itself; None for an open route."""
    dependant = getattr(route, "dependant", None)
    for dep in dependant.dependencies if dependant is not None else ():
        if isinstance(dep.call, Guard):
            return dep.call.scope
    declared = (getattr(route, "openapi_extra", None) or {}).get(SCOPE_KEY)
    return Scope(declared) if declared else None
