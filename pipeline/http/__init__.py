"""The HTTP side of edgepipe: the service (`create_app`) and the ASGI traffic collector."""

from pipeline.http.client import HttpSink, QueueSink
from pipeline.http.collector import CollectorStats, TrafficCollector


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """`pipeline.http.app.create_app`, imported on first use (the collector alone needs no FastAPI)."""
    from pipeline.http.app import create_app as create

    return create(*args, **kwargs)


__all__ = ["CollectorStats", "HttpSink", "QueueSink", "TrafficCollector", "create_app"]
