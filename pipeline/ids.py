"""UUIDv7 ids: time-ordered, so message and event ids sort roughly by creation time."""

from __future__ import annotations

import os
import time

_VARIANT = "89ab"  # the two top bits of the clock_seq nibble are 10


def uuid7_batch(n: int) -> list[str]:
    """`n` RFC 9562 version-7 UUID strings sharing one millisecond timestamp (48 bits),
    each with 74 random bits. One clock read and one `os.urandom` call for the batch."""
    ms = f"{(time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF:012x}"
    head = f"{ms[:8]}-{ms[8:]}-7"
    rand = os.urandom(10 * n).hex()
    return [
        f"{head}{r[0:3]}-{_VARIANT[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"
        for r in (rand[i : i + 20] for i in range(0, 20 * n, 20))
    ]
