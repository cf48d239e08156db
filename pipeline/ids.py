"""UUIDv7 ids: time-ordered, so message and event ids sort roughly by creation time."""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> str:
    """A RFC 9562 version-7 UUID string (48-bit ms timestamp, 74 random bits)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))
