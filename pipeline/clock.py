"""Every "now" in edgepipe goes through here, so time rules are testable with freezegun
and the demo can simulate days in seconds. Uses `time.time()` (which freezegun patches),
never a cached start time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

HOUR_S = 3600
HOUR_MS = HOUR_S * 1000


def now() -> datetime:
    """Current time as an aware UTC datetime."""
    return datetime.fromtimestamp(time.time(), UTC)


def now_s() -> float:
    return time.time()


def now_ms() -> int:
    return int(time.time() * 1000)


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
