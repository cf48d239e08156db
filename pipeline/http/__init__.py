"""The HTTP side of edgepipe: the service (`create_app`) and the ASGI traffic collector."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.http.client import HttpSink, QueueSink
from pipeline.http.collector import CollectorStats, TrafficCollector

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipeline.env import Env


def create_app(env: Env, require_token: bool = False, worker: Any = None) -> FastAPI:
    """`pipeline.http.app.create_app`, imported on first use (the collector alone needs no FastAPI)."""
    from pipeline.http.app import create_app as create

    return create(env, require_token=require_token, worker=worker)


__all__ = ["CollectorStats", "HttpSink", "QueueSink", "TrafficCollector", "create_app"]
