"""`GET /v1/quality`: per-hour data quality counts and rates (`pipeline.quality`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from pipeline import quality
from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.models import ERRORS

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.READ))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)


@router.get("/quality")
def quality_report(request: Request, hours: Annotated[int, Query(ge=1, le=24 * 366)] = 24) -> dict[str, Any]:
    """Per-hour data quality of the last `hours` hours (the current one included): events
    received, inserted, duplicates, invalid (by the field named), too late and overflowed,
    with rates over received, one row per hour, and the window's totals."""
    return quality.report(request.app.state.env.DB, hours)
