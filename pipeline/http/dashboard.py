"""The dashboard: `/dashboard` and its assets, served from the package (no CDN); `/`
redirects there. The page reads only the documented `/v1` API."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
