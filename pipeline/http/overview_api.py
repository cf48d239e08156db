"""The dashboard's views as API: `GET /v1/overview` (tiles, hourly series and top paths of a
range) and `GET /v1/pipeline` (pipeline health)."""

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
