"""`GET /v1/quality`: per-hour data quality counts and rates."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from pipeline.http.access import Guard
from pipeline.http.auth import Scope
from pipeline.http.models import ERRORS

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(Guard(Scope.READ))],
    responses={k: v for k, v in ERRORS.items() if k in (400, 401, 403, 429, 503)},
)
