"""The dashboard's views as API: `GET /v1/overview` (tiles, hourly or daily series and top
paths of a range, `pipeline.overview`) and `GET /v1/pipeline` (pipeline health in one
document); for tokens of scope `read` (or `admin`).

The pipeline document is built by the callable the app was given (`create_app(...,
pipeline_report=)`): the monitor report lives with the workers (`scheduler.monitor`), which
the runtime does not import; `edgepipe serve` passes `pipeline.cli.report.pipeline_document`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from pipeline import overview
from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.errors import ApiError
from pipeline.http.models import ERRORS
from pipeline.http.read_api import time_param

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.READ))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)


@router.get("/overview")
def overview_view(
    request: Request,
    start: Annotated[str | None, Query(alias="from", description="RFC 3339 or epoch seconds, inclusive")] = None,
    end: Annotated[str | None, Query(alias="to", description="RFC 3339 or epoch seconds, exclusive")] = None,
    host: Annotated[str | None, Query(description="Only this host (400 when never seen)")] = None,
    path: Annotated[str | None, Query(description="Only this path (the dashboard's path view)")] = None,
    limit: Annotated[int, Query(ge=1, le=overview.MAX_LIMIT, description="Top paths listed")] = 20,
) -> dict[str, Any]:
    """Totals, one series point per hour (or day) with traffic, and the top paths (each
    with `spark`, its requests in every hour or day of the range) of [from, to), by
    default the last 24 hours. `source` is `hourly`, or `daily` when the range reaches days whose hourly
    rows were pruned (`[retention] hourly_days`). Percentiles are estimated from the
    merged latency histograms."""
    return overview.overview(
        request.app.state.env.DB, time_param(start, "from"), time_param(end, "to"), host, path, limit
    )


@router.get("/pipeline")
def pipeline_view(request: Request) -> dict[str, Any]:
    """Pipeline health: `monitor` (the report of `edgepipe monitor --json`: queue, DLQ,
    capacity, archive, lag, alerts), `status` (workers and heartbeats, `edgepipe status
    --json`), `jobs` (cron, next fire time and last run, `edgepipe jobs list --json`), and
    `dlq_by_reason` / `rejected`: dead letters held now and for good, per reason."""
    build = request.app.state.pipeline_report
    if build is None:
        raise ApiError(503, "not_available", "this server was started without the pipeline report")
    return build(request.app.state.env)
