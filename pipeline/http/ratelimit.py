"""Per-caller request rate limits: a token bucket per API token (per client address when
the API is open), in this process's memory.

A bucket holds up to `burst` requests and refills at `rate` requests a second; a request
takes one, or is refused with the seconds until one is back (the 429's `Retry-After`).
Several `serve` processes each keep their own buckets, so N processes behind one load
balancer admit up to N times the rate. The clock is injected (`now`), monotonic by default.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from pipeline import clock

MAX_KEYS = 10_000  # buckets kept before idle (full) ones are dropped


class RateLimiter:
    def __init__(
        self, rate: float, burst: int, now: Callable[[], float] = clock.monotonic, max_keys: int = MAX_KEYS
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.now = now
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (requests left, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> int | None:
        """Take one request from `key`'s bucket: None when admitted, else the whole seconds
        (at least 1) until the bucket holds a request again."""
        if not self.enabled:
            return None
        with self._lock:
            now = self.now()
            left, at = self._buckets.get(key, (float(self.burst), now))
            left = min(float(self.burst), left + max(0.0, now - at) * self.rate)
            if left >= 1:
                self._buckets[key] = (left - 1, now)
                if len(self._buckets) > self.max_keys:
                    self._prune(now)
                return None
            self._buckets[key] = (left, now)
            return max(1, math.ceil((1 - left) / self.rate))

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled (forgetting them changes nothing); if that is
        not enough, the least recently used half."""
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(self._buckets) > self.max_keys:
            newest = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[len(self._buckets) // 2 :]
            self._buckets = dict(newest)
