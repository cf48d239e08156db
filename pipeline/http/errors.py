"""Every HTTP error has one shape, `{"error": code, "detail": "…"}`: `ApiError` for the
service's own refusals, edgepipe's exceptions mapped by their class and `code`, and
FastAPI's and Starlette's errors (400 for invalid parameters, not 422)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import log
from pipeline.errors import BindingError, EdgepipeError, NotFound, TransientError, ValidationError

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
                415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable"}  # fmt: skip
RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(
    http_status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=http_status, headers=headers)


def _status_of(exc: EdgepipeError) -> int:
    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, BindingError):
        return 503
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(EdgepipeError)
    async def _edgepipe(_: Request, exc: EdgepipeError) -> Response:
        status = _status_of(exc)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, TransientError) else None
        if status >= 500:
            log.event("http_error", logging.WARNING, code=exc.code, error=str(exc))
        return error_response(status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header"))
        return error_response(400, "validation_error", f"{where}: {err.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
