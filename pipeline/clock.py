"""Every "now" in edgepipe goes through here, so time rules are testable with freezegun
and the demo can simulate days in seconds. Uses `time.time()` (which freezegun patches),
never a cached start time, unless a simulated clock is set (`simulated`): then every wall
clock reading in the process is the simulated instant, which only its owner moves.
`monotonic` (durations, budgets) and `sleep` stay real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

HOUR_S = 3600
HOUR_MS = HOUR_S * 1000


_simulated: float | None = None  # the simulated wall clock (epoch seconds), when one is set


def now() -> datetime:
    """Current time as an aware UTC datetime."""
    return datetime.fromtimestamp(now_s(), UTC)


def now_s() -> float:
    return time.time() if _simulated is None else _simulated


def now_ms() -> int:
    return int(now_s() * 1000)


@contextmanager
def simulated(start_s: float) -> Iterator[Callable[[float], None]]:
    """Run the block on a simulated wall clock starting at `start_s`; yields `set_to(t)`,
    which moves it (never backwards: a ValueError). The real clock is back on exit."""
    global _simulated
    if _simulated is not None:
        raise RuntimeError("a simulated clock is already running")

    def set_to(t: float) -> None:
        global _simulated
        if _simulated is not None and t < _simulated:
            raise ValueError(f"the simulated clock cannot go back from {iso(_simulated)} to {iso(t)}")
        _simulated = t

    _simulated = start_s
    try:
        yield set_to
    finally:
        _simulated = None


def monotonic() -> float:
    return time.monotonic()


def sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def hour_of_ms(ts_ms: int) -> int:
    """Start of the UTC hour containing `ts_ms`, in epoch seconds."""
    return (ts_ms // 1000) // HOUR_S * HOUR_S


def iso(ts_s: float) -> str:
    """RFC 3339 UTC with a trailing Z, second precision when whole."""
    dt = datetime.fromtimestamp(ts_s, UTC)
    if dt.microsecond:
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: str | int | float | datetime) -> float:
    """Parse epoch seconds, RFC 3339 or a date (`2026-11-19`) into epoch seconds (UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, int | float):
        return float(value)
    else:
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not a time: {value!r} (use RFC 3339, e.g. 2026-11-19T02:00:00Z)") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
