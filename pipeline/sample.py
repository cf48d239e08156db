"""Synthetic traffic for the demo and the benchmarks: skewed paths (Zipf-like), random
UUID4 ids, roughly time-ordered arrival over a span of days with jitter."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline import clock

METHODS = ("GET",) * 8 + ("POST",) * 2 + ("PUT", "DELETE")
STATUSES, STATUS_CUM = (200, 201, 304, 404, 500, 503), (80, 85, 91, 97, 99, 100)
COLOS = ("FRA", "AMS", "SJC", "NRT")
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


class DemoTraffic:
    """The demo's producer: events of a simulated deployment, one time slice at a time.

    Traffic follows a daily curve (a sine around `rate` events per second: a peak of
    1.6 × rate at 15:00 UTC, a trough of 0.4 × rate at 03:00), over `n_paths` skewed paths.
    Besides the new events, a slice carries what real producers send too:
    * resent duplicates: `duplicate_share` of the events come again in the next slice,
      with the same id and ts (a client retrying after a timeout);
    * late events: one in `late_every` has a ts 1–6 hours back, one in `very_late_every`
      4–5 days back (older than the archive watermark once the archive has run: `too_late`);
    * poison: one in `poison_every` is invalid (a status out of range: `invalid`).
    Counters say what was sent; `unique` counts the distinct events the store must hold,
    given the archive watermark the caller passes for the slice."""

    def __init__(self, rate: float, seed: int = 7, n_paths: int = 300, duplicate_share: float = 0.2) -> None:
        self.rate = rate
        self.rng = random.Random(seed)
        self.paths = make_paths(n_paths, self.rng)
        weights = [1 / (i + 1) ** 1.1 for i in range(len(self.paths))]
        total = 0.0
        self.cum = []
        for w in weights:
            total += w
            self.cum.append(total)
        self.duplicate_share = duplicate_share
        self.late_every, self.very_late_every, self.poison_every = 1000, 20_000, 5000
        self._resend: list[dict[str, Any]] = []
        self._carry = 0.0
        self.sent = self.unique = self.duplicates = self.invalid = self.too_late = 0

    @staticmethod
    def curve(ts_s: float) -> float:
        """The traffic level at `ts_s` relative to the mean (the mean over a day is 1)."""
        hour = (ts_s % 86_400) / 3600
        return 1 + 0.6 * math.sin(2 * math.pi * (hour - 9) / 24)

    def slice(self, start_s: float, end_s: float, watermark_ms: int) -> list[dict[str, Any]]:
        """The messages sent during [start_s, end_s): new events in ts order, then the
        duplicates resent from the previous slice. `watermark_ms`: the archive watermark the
        consumer will hold these against (an older event is refused as too late)."""
        rng = self.rng
        expected = self.rate * self.curve((start_s + end_s) / 2) * (end_s - start_s) + self._carry
        n = int(expected)
        self._carry = expected - n
        lo, span = int(start_s * 1000), int((end_s - start_s) * 1000)
        draw = rng.random
        stamps = sorted([lo + int(draw() * span) for _ in range(n)])
        picks = rng.choices(self.paths, cum_weights=self.cum, k=n)
        statuses = rng.choices(STATUSES, cum_weights=STATUS_CUM, k=n)
        methods = rng.choices(METHODS, k=n)
        colos = rng.choices(COLOS, k=n)
        out: list[dict[str, Any]] = []
        resend, self._resend = self._resend, []
        lognorm, bits = rng.lognormvariate, rng.getrandbits
        for ts, path, status, method, colo in zip(stamps, picks, statuses, methods, colos, strict=True):
            event = {
                "id": f"{bits(128):032x}",
                "ts": ts,
                "method": method,
                "path": path,
                "status": status,
                "response_time_ms": round(lognorm(3.3, 0.9), 2),
                "host": "api.example.com",
                "colo": colo,
                "bytes": 200 + int(draw() * 49_801),
            }
            kind = int(draw() * self.very_late_every)
            if kind % self.poison_every == 1:
                event["status"] = 1000 + rng.randrange(1000)
                self.invalid += 1
                out.append(event)
                continue
            if kind == 0:
                ts -= rng.randint(4 * 86_400_000, 5 * 86_400_000)
            elif kind % self.late_every == 2:
                ts -= rng.randint(3_600_000, 6 * 3_600_000)
            event["ts"] = ts
            if ts < watermark_ms:
                self.too_late += 1
            else:
                self.unique += 1
                if draw() < self.duplicate_share:
                    self._resend.append(event)
            out.append(event)
        self.duplicates += len(resend)
        out.extend(resend)
        self.sent += len(out)
        return out
