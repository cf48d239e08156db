"""UUIDv7 ids: time-ordered, so message and event ids sort roughly by creation time."""

from __future__ import annotations

import os
import time

_VARIANT = "89ab"  # the two top bits of the clock_seq nibble are 10
_HEX3 = tuple(f"{i:03x}" for i in range(4096))  # the last three hex digits of a counted id


def uuid7_batch(n: int) -> list[str]:
    """`n` RFC 9562 version-7 UUID strings sharing one millisecond timestamp (48 bits), in
    increasing order: the 74 bits after it (less the version and variant) are random for
    the first and counted up by one for each next (RFC 9562 §6.2, method 2: monotonic
    random), only the last 48 of them counting. One clock read and one `os.urandom` call
    for the batch, and a string concatenation per id; another batch of the same
    millisecond repeats one of these ids with a probability below 2^-50, even at a million
    ids each."""
    ms = f"{(time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF:012x}"
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 + 2 + 12 + 48 used, the top 6 spare
    a, v, b, start = rand >> 62 & 0xFFF, rand >> 60 & 3, rand >> 48 & 0xFFF, rand & 0xFFFF_FFFF_FFFF
    count = min(start, 2**48 - n)  # the counter never wraps
    head = f"{ms[:8]}-{ms[8:]}-7{a:03x}-{_VARIANT[v]}{b:03x}-"
    ids: list[str] = []
    while len(ids) < n:  # in runs that share all but the last three hex digits
        high, low = divmod(count, 4096)
        take = min(4096 - low, n - len(ids))
        ids += map(f"{head}{high:09x}".__add__, _HEX3[low : low + take])
        count += take
    return ids
