"""The HTTP service: `create_app(env)` builds the FastAPI app over one `Env`.

- `POST /v1/events` takes a JSON array or NDJSON (optionally gzip), validates each event
  like the consumer does, and answers 202 only after the accepted ones are committed to the
  queue, as few JSON-array messages as the message size limit allows (one for a typical
  request); refusals of a whole body enqueue nothing. Backpressure (`max_queue_depth`)
  counts queue messages, not events.
- `GET /v1/...` is the read API (`read_api`, `overview_api`, ...), `/health`, `/ready` and
  `/metrics` the operational endpoints, `/dashboard` the dashboard page (`dashboard`).
- Every error has one shape, `{"error": code, "detail": "…"}`; edgepipe's exceptions map by
  their `code`.

Access (`access`): bearer tokens with a scope (`edgepipe tokens create NAME --scope …`).
When any token that is not revoked exists, every route but `/health`, `/ready`, the
OpenAPI pages and the (static) dashboard page and assets needs one whose scope grants the
route's (`ingest` for POST /v1/events, `read` for the read API and `/metrics`, `admin`
for `/v1/audit`; `admin` grants all);
with none, the app is open unless `require_token` (what `serve` passes when bound to a
non-loopback address or behind a proxy, where it also refuses to start without a token). Each caller is
rate-limited (`[http] rate_limit_per_s`, `burst`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio import to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from pipeline import audit, clock, log
from pipeline.env import Env
from pipeline.http import audit_api, body, dashboard, events_api, overview_api, probes, quality_api, read_api
from pipeline.http.access import BEARER, SCOPE_KEY, Guard, app_routes, authorize, route_scope
from pipeline.http.auth import Scope, TokenChecker
from pipeline.http.enqueue import DepthGauge, GroupSender
from pipeline.http.errors import RETRY_AFTER_S, ApiError, error_response, install_error_handlers
from pipeline.http.metrics import CONTENT_TYPE, Metrics
from pipeline.http.models import ERRORS, Accepted, Checks, ErrorBody, event_request_body
from pipeline.http.ratelimit import RateLimiter
from pipeline.http.transport import Transport
from pipeline.paths import PathNormalizer

KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive: an idle kept-alive connection is closed after this
CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's convention)


def _lifespan(worker: Any) -> Any:
    """Run an in-process consumer (`serve --consume`) on a thread while the app is up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = None
        if worker is not None:
            worker.on_batch.append(app.state.metrics.observe_batch)
            thread = threading.Thread(target=worker.run, name="edgepipe-consumer", daemon=True)
            thread.start()
        try:
            yield
        finally:
            if thread is not None:
                worker.request_stop()
                await to_thread.run_sync(thread.join)
            await to_thread.run_sync(app.state.tokens.close)

    return lifespan


def run_server(
    app: FastAPI, host: str, port: int, keep_alive_s: int = KEEP_ALIVE_S, transport: Transport | None = None
) -> None:
    """Serve `app` as `edgepipe serve` does: uvicorn, no access log (one line per request is
    the collector's job, and it never logs headers), TLS and trusted proxies as `transport`
    says (checked by the caller: `Transport.check`). Everything built at start-up (modules,
    the schema, the routes) is first moved out of the garbage collector's sight
    (`gc.freeze`): the server's heap is mostly such objects, and every full collection
    would walk them all again while requests wait.

    Slow clients: an idle kept-alive connection is closed after `keep_alive_s` seconds and a
    POST /v1/events body must arrive within `[http] body_timeout`, but uvicorn puts no limit
    on a connection that sends nothing or trickles its request line and headers; in front
    of untrusted clients, a reverse proxy must time those out."""
    import gc

    import uvicorn

    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=keep_alive_s,
        **(transport or Transport()).uvicorn_options(),
    )


def create_app(
    env: Env,
    require_token: bool = False,
    worker: Any = None,
    pipeline_report: Callable[[Env], dict[str, Any]] | None = None,
) -> FastAPI:
    """The app over `env`. `require_token`: refuse unauthenticated requests even when no
    token exists. `worker`: a `pipeline.worker.Worker` to run alongside, on a thread.
    `pipeline_report`: builds the `GET /v1/pipeline` document (without it, 503)."""
    app = FastAPI(
        title="edgepipe",
        version="1",
        description="Traffic events in, per-path statistics out.",
        lifespan=_lifespan(worker),
        responses={},
    )
    app.state.env = env
    app.state.pipeline_report = pipeline_report
    cfg = env.config.http
    app.state.tokens = TokenChecker(env.DB, always_required=require_token)
    app.state.limiter = RateLimiter(cfg.rate_limit_per_s, cfg.burst)
    app.state.failed_auth = audit.FailedAuthLimiter()
    app.state.metrics = Metrics(env)
    app.state.sender = GroupSender(env.QUEUE)
    app.state.depth = DepthGauge(env.QUEUE, cfg.max_queue_depth, cfg.depth_check_interval)
    app.state.normalizer = PathNormalizer(env.config.paths)
    install_error_handlers(app)
    app.include_router(read_api.router)
    app.include_router(audit_api.router)
    app.include_router(events_api.router)
    app.include_router(quality_api.router)
    app.include_router(overview_api.router)
    app.include_router(dashboard.router)
    _add_events_route(app)
    _add_ops_routes(app)
    _finish_openapi(app)
    return app


def _finish_openapi(app: FastAPI) -> None:
    """Invalid parameters answer 400 in the one error shape, not FastAPI's 422: say so. And
    name the scope each secured operation needs (`x-scope`)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for route in app_routes(app):
                if getattr(route, "include_in_schema", False) and (scope := route_scope(route)):
                    for method in route.methods or ():
                        schema["paths"][route.path_format][method.lower()][SCOPE_KEY] = scope.value
            for item in schema["paths"].values():
                for op in item.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault(
                            "400", {"description": ERRORS[400]["description"], "content": _error_content()}
                        )
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _add_events_route(app: FastAPI) -> None:
    @app.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=ERRORS | {408: {"model": ErrorBody, "description": "Body not received within body_timeout"}},
        openapi_extra=event_request_body() | BEARER | {SCOPE_KEY: Scope.INGEST.value},
    )
    async def post_events(request: Request) -> Response:
        """Enqueue traffic events. 202 once the accepted ones are durably in the queue;
        `rejected` lists the others with the field at fault."""
        await authorize(request, Scope.INGEST)  # not a dependency: FastAPI's resolution costs more than the check
        state = request.app.state
        metrics: Metrics = state.metrics
        cfg = state.env.config.http
        try:
            kind = body.body_kind(request.headers.get("content-type"))
            gzipped = body.check_encoding(request.headers.get("content-encoding"))
            if await state.depth.over_limit():
                metrics.refused.labels("queue_full").inc()
                raise ApiError(503, "queue_full", f"the queue holds more than {cfg.max_queue_depth} messages",
                               {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cfg.max_body_bytes:
                raise body.BodyError(
                    413, "payload_too_large", f"body exceeds max_body_bytes ({cfg.max_body_bytes} bytes)"
                )
            data = await body.read_body(request.stream(), gzipped, cfg.max_body_bytes, cfg.body_timeout)
            values = body.decode(data, kind, cfg.max_events_per_request)
        except body.BodyError as exc:
            metrics.refused.labels(exc.code).inc()
            # A timed-out body may still be arriving: the connection cannot carry another request.
            headers = {"Connection": "close"} if exc.status == 408 else None
            return error_response(exc.status, exc.code, exc.detail, headers)
        except ClientDisconnect:
            # The client went away mid-body: nothing to enqueue and nobody to answer.
            metrics.refused.labels("client_disconnect").inc()
            log.event("http_client_disconnect", logging.DEBUG, method="POST", path="/v1/events")
            return Response(status_code=CLIENT_CLOSED)
        checked = body.validate(values, state.normalizer, clock.now_ms())
        # The events are encoded in checked.messages: free the decoded ones before waiting
        # for the commit, so concurrent requests do not keep thousands of dicts alive for the
        # garbage collector to trace and promote.
        del values
        await state.sender.send(checked.messages)
        state.depth.add(len(checked.messages))
        metrics.accepted.inc(checked.accepted)
        metrics.rejected.inc(len(checked.rejected))
        return JSONResponse({"accepted": checked.accepted, "rejected": checked.rejected}, status_code=202)


async def _run_check(env: Env, name: str, timeout: float) -> dict[str, Any]:
    started = clock.monotonic()
    try:
        with anyio.fail_after(timeout):
            detail = await to_thread.run_sync(probes.CHECKS[name], env, abandon_on_cancel=True)
    except TimeoutError:
        return {"ok": False, "detail": f"timed out after {timeout:g} s"}
    except Exception as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    out: dict[str, Any] = {"ok": True, "ms": round((clock.monotonic() - started) * 1000, 1)}
    if detail is not None:
        out["ok"] = detail == probes.NOT_CONFIGURED
        out["detail"] = detail
    return out


_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {CONTENT_TYPE.split(";")[0]: {}}},
    **{k: ERRORS[k] for k in (401, 403, 429)},
}


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is up and serving."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Checks, responses={503: {"model": ErrorBody, "description": "A part is failing"}})
    async def ready(request: Request) -> Response:
        """DB, queue, KV and archive reachable and a worker heartbeat fresh; else 503 naming
        the failing parts."""
        env: Env = request.app.state.env
        timeout = env.config.http.ready_timeout
        results: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            results[name] = await _run_check(env, name, timeout)

        async with anyio.create_task_group() as tg:
            for name in probes.CHECKS:
                tg.start_soon(one, name)
        checks = {name: results[name] for name in probes.CHECKS}
        failing = [n for n, r in checks.items() if not r["ok"]]
        if failing:
            detail = "; ".join(f"{n}: {checks[n]['detail']}" for n in failing)
            return error_response(503, "not_ready", detail, status="not_ready", checks=checks, failing=failing)
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get(
        "/metrics",
        dependencies=[Depends(Guard(Scope.READ))],
        response_class=Response,
        responses=_METRICS_RESPONSES,
    )
    def metrics(request: Request) -> Response:
        """Prometheus exposition format."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
