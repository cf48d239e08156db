"""`GET /v1/audit`: the audit log (`pipeline.audit`), oldest first, for `admin` tokens.

Rows are those of `edgepipe audit --json`. Pages are keyed by `seq` (the cursor holds the
last row's time and `seq`); a following page re-reads from `SKEW_MARGIN_S` before that
time, so a row written by a process whose clock is slightly behind still shows up once.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from pipeline import audit, clock
from pipeline.bindings.db import Database
from pipeline.cursor import decode_cursor, encode_cursor
from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.models import ERRORS, AuditPage
from pipeline.http.read_api import time_param

SKEW_MARGIN_S = 5.0
EXTRA_ROWS = 16  # rows of the previous page read again, at first, to find where the next one starts

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.ADMIN))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)


def audit_page(
    db: Database, since: float | None, action: str | None, limit: int, after: tuple[float, int] | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `limit` rows from `since` (epoch s) with `seq` above the cursor's, and the
    cursor of the following page (None on the last one)."""
    if after is None:
        rows = audit.entries(db, since, limit + 1, action)
    else:
        at, seq = after
        start = at - SKEW_MARGIN_S if since is None else max(since, at - SKEW_MARGIN_S)
        want = limit + 1 + EXTRA_ROWS
        while True:
            fetched = audit.entries(db, start, want, action)
            rows = [r for r in fetched if r["seq"] > seq]
            if len(rows) > limit or len(fetched) < want:
                break
            want += max(EXTRA_ROWS, want - limit - 1)  # read twice as many of the earlier rows again
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = encode_cursor([float(clock.parse_time(rows[-1]["at"])), rows[-1]["seq"]])
    return rows, nxt


@router.get("/audit", response_model=AuditPage)
def audit_log(
    request: Request,
    since: Annotated[str | None, Query(description="RFC 3339 or epoch seconds, inclusive")] = None,
    action: Annotated[str | None, Query(description="Only this action, e.g. `auth.failed`")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Who did what, when, from where and how it ended: token and DLQ operations, restores,
    manual job runs, failed authentication, the configuration each server loaded. Oldest
    first; never a secret."""
    after = decode_cursor(cursor, (float, int))
    rows, nxt = audit_page(request.app.state.env.DB, time_param(since, "since"), action or None, limit, after)
    return {"rows": rows, "next": nxt}
