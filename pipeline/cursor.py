"""Opaque keyset cursors of paged listings (the HTTP API's `next`, the CLI's `--cursor`):
the key of the last row, as URL-safe base64 of its JSON."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from pipeline.errors import ValidationError


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str | None, types: tuple[type, ...]) -> tuple[Any, ...] | None:
    if not cursor:
        return None
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if len(key) != len(types) or not all(type(v) is t for v, t in zip(key, types, strict=True)):
            raise ValueError
    except (ValueError, TypeError):
        raise ValidationError("cursor", "not a cursor returned by this endpoint") from None
    return tuple(key)
