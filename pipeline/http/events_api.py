"""`GET /v1/events`: the hot detail rows, newest first, paged with a cursor; for tokens of
scope `read` (or `admin`). The rows and the walk are `pipeline.detail`'s, shared with
`edgepipe events`; `POST /v1/events` (ingest) is the app's own route."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from pipeline import detail
from pipeline.cursor import decode_cursor, encode_cursor
from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.models import ERRORS
from pipeline.http.read_api import time_param

MAX_LIMIT = 1000

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.READ))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)


class EventRow(BaseModel):
    ts: str = Field(description="RFC 3339 with milliseconds, UTC")
    id: str
    method: str
    path: str = Field(description="Normalised, as stored")
    status: int
    response_time_ms: float
    host: str = Field(description="Lower-case; empty when the event had none")
    colo: str | None
    bytes: int | None
    overflow: bool = Field(description="Counted under `__other__` in the aggregates (the hour's path budget was spent)")


class EventsPage(BaseModel):
    rows: list[EventRow]
    next: str | None = Field(description="Pass as `cursor` to get the following rows; null on the last page")


@router.get("/events", response_model=EventsPage)
def events(
    request: Request,
    since: Annotated[str | None, Query(description="RFC 3339, a date or epoch seconds, inclusive")] = None,
    until: Annotated[str | None, Query(description="RFC 3339, a date or epoch seconds, exclusive")] = None,
    path: Annotated[str | None, Query(description="Normalised as the consumer normalises paths")] = None,
    method: str | None = None,
    status: Annotated[str | None, Query(description="A code (`404`) or a class (`5xx`)")] = None,
    host: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Detail rows of the hot table (the last `[retention] detail_days` days), newest first,
    that match every filter given; read from the (ts, id) index, never a scan of the
    table. Without `since`, from the newest row back to the oldest still held."""
    after = decode_cursor(cursor, (int, str))
    f = detail.filters(
        request.app.state.normalizer,
        since=time_param(since, "since"),
        until=time_param(until, "until"),
        path=path or None,
        method=method or None,
        status=status or None,
        host=host or None,
    )
    page = detail.page(request.app.state.env.DB, f, limit, None if after is None else detail.check_cursor(after))
    return {"rows": page.rows, "next": None if page.next is None else encode_cursor(list(page.next))}
