"""Synthetic traffic for the demo and the benchmarks: skewed paths (Zipf-like), random
UUID4 ids, roughly time-ordered arrival over a span of days with jitter."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline import clock

METHODS = ("GET",) * 8 + ("POST",) * 2 + ("PUT", "DELETE")
RESOURCES = ("users", "orders", "products", "carts", "sessions", "search", "reviews", "images")


def make_paths(n: int, rng: random.Random) -> list[str]:
    paths = ["/", "/health", "/login"]
    while len(paths) < n:
        res = rng.choice(RESOURCES)
        depth = rng.randint(1, 3)
        segs = [f"v{rng.randint(1, 3)}", res] + [f"{rng.choice(RESOURCES)}{rng.randint(0, 99)}" for _ in range(depth)]
        paths.append("/" + "/".join(segs))
    return paths[:n]


def events(
    n: int,
    days: float = 5.0,
    n_paths: int = 2000,
    end_ms: int | None = None,
    seed: int = 42,
    jitter_ms: int = 60_000,
) -> Iterator[dict[str, Any]]:
    """`n` events spread evenly over the `days` before `end_ms` (default: now)."""
    rng = random.Random(seed)
    paths = make_paths(n_paths, rng)
    weights = [1 / (i + 1) for i in range(len(paths))]
    end_ms = clock.now_ms() - jitter_ms if end_ms is None else end_ms
    span = int(days * 86_400_000)
    start = end_ms - span
    chunk = 4096
    for base in range(0, n, chunk):
        picks = rng.choices(paths, weights, k=min(chunk, n - base))
        for i, path in enumerate(picks):
            k = base + i
            ts = start + span * k // max(n, 1) + rng.randint(-jitter_ms, jitter_ms)
            status = rng.choices((200, 201, 304, 404, 500, 503), (80, 5, 6, 6, 2, 1))[0]
            rt = round(rng.lognormvariate(3.3, 0.9), 2)
            yield {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "ts": min(ts, end_ms),
                "method": rng.choice(METHODS),
                "path": path if rng.random() > 0.1 else f"{path}/{rng.randint(1, 10**6)}",
                "status": status,
                "response_time_ms": rt,
                "host": "api.example.com",
                "colo": rng.choice(("FRA", "AMS", "SJC", "NRT")),
                "bytes": rng.randint(200, 50_000),
            }
