"""Read API: top paths, hourly and daily rows, hot/cold/total counts, job runs, archive
objects; for tokens of scope `read` (or `admin`).

Rows carry the field names of the CLI's `--json` (`pipeline.queries`). Handlers are plain
functions, so FastAPI runs them in its thread pool and the event loop never waits on SQL.
Long listings page with an opaque keyset cursor (`next`, passed back as `cursor`).
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request

from pipeline import clock, queries, totals
from pipeline.cursor import decode_cursor, encode_cursor
from pipeline.env import Env
from pipeline.errors import ValidationError
from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.models import ERRORS, PagedRows, Rows, TopPaths
from pipeline.jobruns import JobStore
from pipeline.schema import archive_objects
from pipeline.snapshot_doc import read_latest

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.READ))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)
HOURLY_LIMIT = 10_000
DAY_S = 86_400


def _env(request: Request) -> Env:
    return request.app.state.env


def time_param(value: str | None, name: str) -> float | None:
    """Epoch seconds of an RFC 3339 or epoch-seconds query parameter; None when absent."""
    if value is None or value == "":
        return None
    try:
        return clock.parse_time(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValidationError(name, str(exc)) from None


def _snapshot_rows(env: Env, hours: int, limit: int) -> dict[str, Any] | None:
    """The KV snapshot's rows when it covers exactly this window, holds enough rows and is
    younger than `[http] snapshot_max_age`; else None (compute from the aggregates)."""
    doc = read_latest(env.KV)
    if not doc or doc.get("window_hours") != hours:
        return None
    paths = doc.get("paths") or []
    if limit > int(doc.get("top_n", 0)) and len(paths) >= int(doc.get("top_n", 0)):
        return None
    age = clock.now_s() - clock.parse_time(doc["generated_at"])
    if not -60 <= age <= env.config.http.snapshot_max_age:
        return None
    return {"source": "snapshot", "hours": hours, "generated_at": doc["generated_at"], "rows": paths[:limit]}


@router.get("/paths/top", response_model=TopPaths)
def paths_top(
    request: Request,
    hours: Annotated[int, Query(ge=1, le=24 * 366)] = 24,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 20,
) -> dict[str, Any]:
    """The busiest paths over the last `hours` hours: from the KV snapshot when it is fresh
    and covers the request, else from the hourly aggregates (`source` says which). A window
    longer than the hourly rows are kept (`[retention] hourly_days`) is refused."""
    env = _env(request)
    kept = env.config.retention.hourly_days
    if kept and hours > kept * 24:
        raise ValidationError("hours", f"at most {kept * 24}: hourly rows are kept {kept} days; see /v1/paths/daily")
    snap = _snapshot_rows(env, hours, limit)
    if snap is not None:
        return snap
    now = clock.now_s()
    rows = queries.top_paths(env.DB, hours, limit, now)
    return {"source": "aggregates", "hours": hours, "generated_at": clock.iso(int(now)), "rows": rows}


@router.get("/paths/hourly", response_model=PagedRows)
def paths_hourly(
    request: Request,
    path: str | None = None,
    method: str | None = None,
    host: str | None = None,
    start: Annotated[str | None, Query(alias="from", description="RFC 3339 or epoch seconds, inclusive")] = None,
    end: Annotated[str | None, Query(alias="to", description="RFC 3339 or epoch seconds, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = HOURLY_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Hourly rows ordered by (hour, host, path, method); with no filter, every row."""
    env = _env(request)
    after = decode_cursor(cursor, (int, str, str, str))
    rows = list(
        queries.hourly(
            env.DB,
            path,
            method,
            time_param(start, "from"),
            time_param(end, "to"),
            host,
            limit=limit + 1,
            after=after,
        )
    )
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        nxt = encode_cursor([int(clock.parse_time(last["hour"])), last["host"], last["path"], last["method"]])
    return {"rows": rows, "next": nxt}


@router.get("/paths/daily", response_model=PagedRows)
def paths_daily(
    request: Request,
    path: str | None = None,
    method: str | None = None,
    host: str | None = None,
    days: Annotated[int, Query(ge=1, le=36_600, description="The last N days, when `from` is not given")] = 30,
    start: Annotated[str | None, Query(alias="from", description="RFC 3339 or epoch seconds, inclusive")] = None,
    end: Annotated[str | None, Query(alias="to", description="RFC 3339 or epoch seconds, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = HOURLY_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Daily rows (closed UTC days, rolled up at 00:15) ordered by (day, host, path, method):
    the hourly rows' fields with `day` for `hour`. Without `from`, the last `days` days."""
    env = _env(request)
    after = decode_cursor(cursor, (int, str, str, str))
    first = time_param(start, "from")
    if first is None:
        first = (int(clock.now_s()) // DAY_S - days) * DAY_S
    rows = list(queries.daily(env.DB, path, method, first, time_param(end, "to"), host, limit=limit + 1, after=after))
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        nxt = encode_cursor([int(clock.parse_time(last["day"])), last["host"], last["path"], last["method"]])
    return {"rows": rows, "next": nxt}


@router.get("/stats")
def stats(request: Request) -> dict[str, Any]:
    """Hot (detail rows), cold (lifetime totals) and total (hourly aggregates), the queue,
    and `rejected`: events dead-lettered for good per reason (in the DLQ or purged)."""
    env = _env(request)
    return {**totals.stats(env.DB), "queue": env.QUEUE.stats(), "rejected": env.QUEUE.rejected_totals()}


def _iso(v: float | None) -> str | None:
    return clock.iso(v) if v is not None else None


@router.get("/jobs", response_model=Rows)
def jobs(
    request: Request,
    job: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """Recorded job runs, newest first."""
    return {"rows": JobStore(_env(request).DB).history(job or None, limit, status or None)}


@router.get("/archive/objects", response_model=PagedRows)
def archive_list(
    request: Request,
    start: Annotated[str | None, Query(alias="from", description="Event hour ≥ this (RFC 3339 or epoch s)")] = None,
    end: Annotated[str | None, Query(alias="to", description="Event hour < this (RFC 3339 or epoch s)")] = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Archive objects ordered by (hour, key): key, row_count, size_bytes, status, checksums."""
    stmt = sa.select(archive_objects).order_by(archive_objects.c.hour, archive_objects.c.key).limit(limit + 1)
    if (t := time_param(start, "from")) is not None:
        stmt = stmt.where(archive_objects.c.hour >= int(t) // 3600 * 3600)
    if (t := time_param(end, "to")) is not None:
        stmt = stmt.where(archive_objects.c.hour < t)
    if status:
        stmt = stmt.where(archive_objects.c.status == status)
    if (after := decode_cursor(cursor, (int, str))) is not None:
        stmt = stmt.where(sa.tuple_(archive_objects.c.hour, archive_objects.c.key) > sa.tuple_(*after))
    with _env(request).DB.read() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = encode_cursor([rows[-1]["hour"], rows[-1]["key"]])
    for row in rows:
        row["hour"] = clock.iso(row["hour"])
        for k in ("created_at", "verified_at", "cleaned_at"):
            row[k] = _iso(row[k])
    return {"rows": rows, "next": nxt}
