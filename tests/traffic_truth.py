"""Synthetic events with their expected normalised form, and the hourly aggregates they must
produce, computed here without any of edgepipe's code (no normaliser, no histogram module,
no consumer): the ground truth the exactly-once, poison and crash tests compare against."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from pipeline.bindings.db import Database
from pipeline.schema import path_stats_hourly, traffic_events

# Bucket upper bounds (ms) of the documented 1-2-5 series, plus an overflow bucket.
BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 60000)
BUCKETS = [f"lat_le_{b}" for b in BOUNDS] + ["lat_gt_60000"]

# (raw path template, normalised path)
PATHS = [
    ("/", "/"),
    ("/health", "/health"),
    ("/users/{n}", "/users/:id"),
    ("/users/{n}/orders/", "/users/:id/orders"),
    ("/search?q={n}", "/search"),
    ("//static//app.js", "/static/app.js"),
    ("/Items/{uuid}", "/Items/:id"),
    ("/docs#part{n}", "/docs"),
    ("/blob/{hex}", "/blob/:id"),
    ("/v1/Cart/", "/v1/Cart"),
    *((f"/p{k}", f"/p{k}") for k in range(30)),
]
HOSTS = [("API.example.com", "api.example.com"), (None, ""), ("Shop.Example.COM", "shop.example.com")]
METHODS = [("get", "GET"), ("GET", "GET"), ("POST", "POST"), ("Delete", "DELETE")]
STATUSES = (101, 200, 200, 200, 201, 204, 301, 304, 400, 404, 429, 500, 503)
EDGES = (0.0, 1.0, 2.0, 50.0, 1000.0, 60000.0, 60000.001, 75000.5)


@dataclass(frozen=True)
class Truth:
    """One event as the database must see it."""

    ts: int
    id: str
    hour: int
    host: str
    path: str
    method: str
    status: int
    rt: float
    nbytes: int | None


def rfc3339_ms(ts: int) -> str:
    return datetime.fromtimestamp(ts // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ts % 1000:03d}Z"


def make_event(rng: random.Random, now_ms: int, span_ms: int, n: int) -> tuple[dict[str, Any], Truth]:
    template, path = rng.choice(PATHS)
    raw_path = template.format(
        n=rng.randint(0, 10**6), uuid=f"{rng.getrandbits(128):032x}"[:8] + "-1234-4abc-8def-0123456789ab",
        hex=f"{rng.getrandbits(80):020x}",
    )  # fmt: skip
    raw_host, host = rng.choice(HOSTS)
    raw_method, method = rng.choice(METHODS)
    ts = now_ms - rng.randint(0, span_ms)
    rt = rng.choice(EDGES) if rng.random() < 0.1 else round(rng.lognormvariate(3.0, 1.5), 3)
    nbytes = rng.randint(0, 100_000) if rng.random() < 0.8 else None
    status = rng.choice(STATUSES)
    event_id = f"{n:06d}-{rng.getrandbits(64):016x}"
    body: dict[str, Any] = {
        "id": event_id,
        "ts": rfc3339_ms(ts) if rng.random() < 0.2 else ts,
        "method": raw_method,
        "path": raw_path,
        "status": status,
        "response_time_ms": int(rt) if rt.is_integer() and rng.random() < 0.5 else rt,
        "colo": rng.choice(["FRA", "AMS", None]),
        "user_agent": "ignored/1.0",
    }
    if raw_host is not None:
        body["host"] = raw_host
    if nbytes is not None:
        body["bytes"] = nbytes
    hour = ts // 1000 // 3600 * 3600
    return body, Truth(ts, event_id, hour, host, path, method, status, rt, nbytes)


def make_events(seed: int, n: int, now_ms: int, span_ms: int = 3 * 86_400_000) -> list[tuple[dict[str, Any], Truth]]:
    rng = random.Random(seed)
    return [make_event(rng, now_ms, span_ms, i) for i in range(n)]


def bucket_of(rt: float) -> str:
    for bound, name in zip(BOUNDS, BUCKETS, strict=False):
        if rt <= bound:
            return name
    return BUCKETS[-1]


def expected_aggregates(events: Iterable[Truth], other: dict[tuple[int, str], str] | None = None) -> dict:
    """{(hour, host, path, method): {column: value}}; `other` maps (hour, path) of events
    counted as `__other__` (their key's path becomes `__other__`)."""
    out: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    for ev in events:
        path = (other or {}).get((ev.hour, ev.path), ev.path)
        row = out.setdefault(
            (ev.hour, ev.host, path, ev.method),
            {
                "requests": 0,
                **{f"status_{c}xx": 0 for c in range(1, 6)},
                "bytes_sum": 0,
                "rt_sum_ms": 0.0,
                "rt_min_ms": ev.rt,
                "rt_max_ms": ev.rt,
                **dict.fromkeys(BUCKETS, 0),
            },
        )
        row["requests"] += 1
        row[f"status_{ev.status // 100}xx"] += 1
        row["bytes_sum"] += ev.nbytes or 0
        row["rt_sum_ms"] += ev.rt
        row["rt_min_ms"] = min(row["rt_min_ms"], ev.rt)
        row["rt_max_ms"] = max(row["rt_max_ms"], ev.rt)
        row[bucket_of(ev.rt)] += 1
    return out


def stored_aggregates(db: Database) -> dict:
    psh = path_stats_hourly
    keys = ("hour", "host", "path", "method")
    with db.read() as conn:
        rows = conn.execute(sa.select(psh)).mappings().all()
    return {tuple(r[k] for k in keys): {k: v for k, v in r.items() if k not in keys} for r in rows}


def assert_aggregates_equal(db: Database, expected: dict) -> None:
    """Every column of every hourly row, exactly (the float sum within rounding)."""
    stored = stored_aggregates(db)
    assert set(stored) == set(expected), set(stored) ^ set(expected)
    for key, want in expected.items():
        got = dict(stored[key])
        assert abs(got.pop("rt_sum_ms") - want["rt_sum_ms"]) <= 1e-6 * max(1.0, want["rt_sum_ms"]), key
        assert got == {k: v for k, v in want.items() if k != "rt_sum_ms"}, key


def stored_event_keys(db: Database) -> list[tuple[int, str]]:
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(sa.select(traffic_events.c.ts, traffic_events.c.id))]
