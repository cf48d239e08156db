"""Response and request shapes, for the OpenAPI document. Events are validated by
`pipeline.events.parse_event`, not by these models: `EventIn` documents the same rules so
clients (and schema-driven fuzzers) know what is accepted."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.events import MAX_ID_LEN


class ErrorBody(BaseModel):
    """Every error: `error` is a stable code, `detail` a human-readable line naming the field."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


class EventIn(BaseModel):
    model_config = ConfigDict(extra="allow", title="Event")
    id: str | None = Field(None, max_length=MAX_ID_LEN, description="Idempotency key; assigned at enqueue when absent")
    ts: int | str = Field(description="Epoch milliseconds (≥ 2000-01-01, ≤ now + 5 min) or RFC 3339, UTC")
    method: str = Field(pattern=r"^[A-Za-z]{1,16}$")
    path: str = Field(pattern=r"^/", max_length=2048)
    status: int = Field(ge=100, le=599)
    response_time_ms: float = Field(ge=0)
    host: str | None = Field(None, max_length=255)
    colo: str | None = Field(None, max_length=16)
    bytes: int | None = Field(None, ge=0)


class Rejection(BaseModel):
    index: int = Field(description="0-based position of the event in the array (or among non-empty NDJSON lines)")
    field: str
    error: str


class Accepted(BaseModel):
    accepted: int
    rejected: list[Rejection]


class Rows(BaseModel):
    rows: list[dict[str, Any]]


class PagedRows(Rows):
    next: str | None = Field(description="Pass as `cursor` to get the following rows; null on the last page")


class TopPaths(Rows):
    source: str = Field(description="`snapshot` (the KV snapshot) or `aggregates` (computed now)")
    hours: int
    generated_at: str


class AuditEntry(BaseModel):
    seq: int = Field(description="Increasing with every row written")
    at: str = Field(description="RFC 3339, UTC")
    actor: str = Field(description="`token:<id>:<name>`, `cli:<os user>`, `system` or `anonymous`")
    token_id: int | None
    action: str = Field(description="e.g. `tokens.create`, `tokens.revoke`, `auth.failed`, `config.loaded`")
    params: dict[str, Any]
    outcome: str = Field(description="`ok`, `failed` or `denied`")
    detail: str
    client: str | None = Field(description="The client's address, for HTTP requests")


class AuditPage(BaseModel):
    rows: list[AuditEntry]
    next: str | None = Field(description="Pass as `cursor` to get the following rows; null on the last page")


class Checks(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    checks: dict[str, dict[str, Any]]


def event_request_body() -> dict[str, Any]:
    """`openapi_extra` for POST /v1/events: the two accepted media types."""
    schema = EventIn.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": schema}},
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "One JSON event per line"},
                },
            },
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed body or invalid parameter",
        401: "Missing, invalid or expired bearer token",
        403: "The token's scope does not allow this request",
        413: "Body or event count over the limits",
        415: "Unsupported Content-Type or Content-Encoding",
        429: "Over the caller's rate limit (with Retry-After); nothing was done",
        503: "Queue full (with Retry-After) or a binding unavailable",
    }.items()
}
