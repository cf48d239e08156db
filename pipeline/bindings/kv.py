"""The KV binding, with Workers KV semantics.

`get(key, type=)` returns None for a missing or expired key; `put` replaces the value and
its metadata in one step (a reader sees the old pair or the new one, never a mix); `list`
returns keys in byte order of their UTF-8 encoding, at most `limit` per call, with an
opaque `cursor` and `list_complete`. Expired keys are invisible to `get` and `list`.

Limits, as on Cloudflare, checked before anything is written: a key is 1–512 bytes and
not `.` or `..`; a value ≤ 25 MiB; metadata ≤ 1024 bytes once serialised to JSON;
`expiration_ttl` ≥ 60 s and an absolute `expiration` at least 60 s in the future.

Values may be `str`, `bytes`, or any JSON-serialisable object (stored as its JSON text),
so `put(k, {"a": 1})` then `get(k, "json")` round-trips.
"""

from __future__ import annotations

import abc
import base64
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from pipeline import clock
from pipeline.errors import ValidationError

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 25 * 1024 * 1024
MAX_METADATA_BYTES = 1024
MIN_TTL_S = 60
MAX_LIST_LIMIT = 1000

ValueType = Literal["text", "json", "bytes"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry as a backend returns it (already known to be unexpired)."""

    value: bytes
    metadata: str | None
    expiration: float | None


def check_key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise ValidationError("key", f"must be a string, got {type(key).__name__}")
    raw = key.encode("utf-8")
    if not raw:
        raise ValidationError("key", "must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise ValidationError("key", f"{len(raw)} bytes exceeds the {MAX_KEY_BYTES}-byte limit")
    if key in (".", ".."):
        raise ValidationError("key", f"{key!r} is not allowed")
    return raw


def encode_value(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
    elif value is None:
        raise ValidationError("value", "must not be None (use delete)")
    else:
        try:
            data = orjson.dumps(value)
        except TypeError as exc:
            raise ValidationError("value", f"not str, bytes or JSON-serialisable: {exc}") from None
    if len(data) > MAX_VALUE_BYTES:
        raise ValidationError("value", f"{len(data)} bytes exceeds the {MAX_VALUE_BYTES}-byte limit")
    return data


def encode_metadata(metadata: Any) -> str | None:
    if metadata is None:
        return None
    try:
        text = orjson.dumps(metadata).decode()
    except TypeError as exc:
        raise ValidationError("metadata", f"not JSON-serialisable: {exc}") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ValidationError("metadata", f"{len(text.encode())} bytes serialised exceeds {MAX_METADATA_BYTES}")
    return text


def resolve_expiration(expiration: float | None, expiration_ttl: float | None) -> float | None:
    """Absolute expiry (epoch seconds) from either form; None means never."""
    if expiration is not None and expiration_ttl is not None:
        raise ValidationError("expiration", "give expiration or expiration_ttl, not both")
    now = clock.now_s()
    if expiration_ttl is not None:
        if not isinstance(expiration_ttl, int | float) or expiration_ttl < MIN_TTL_S:
            raise ValidationError("expiration_ttl", f"must be a number ≥ {MIN_TTL_S} seconds, got {expiration_ttl!r}")
        return now + float(expiration_ttl)
    if expiration is not None:
        if not isinstance(expiration, int | float) or expiration < now + MIN_TTL_S:
            raise ValidationError(
                "expiration", f"must be epoch seconds at least {MIN_TTL_S} s in the future, got {expiration!r}"
            )
        return float(expiration)
    return None


def decode_value(data: bytes, type: ValueType) -> Any:
    if type == "text":
        return data.decode("utf-8")
    if type == "json":
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValidationError("type", f"stored value is not JSON: {exc}") from None
    if type == "bytes":
        return data
    raise ValidationError("type", f"must be text, json or bytes, got {type!r}")


def encode_cursor(last_key: bytes) -> str:
    return base64.urlsafe_b64encode(last_key).decode()


def decode_cursor(cursor: str | None) -> bytes | None:
    if not cursor:
        return None
    try:
        return base64.urlsafe_b64decode(cursor.encode())
    except (ValueError, TypeError):
        raise ValidationError("cursor", "not a cursor returned by list()") from None


class KV(abc.ABC):
    """One KV namespace. Implementations store entries and answer the primitive reads; the
    checks and encodings shared by every backend live here, once."""

    @abc.abstractmethod
    def _read(self, key: bytes) -> Entry | None:
        """The unexpired entry under `key`, or None."""

    @abc.abstractmethod
    def _write(self, key: bytes, value: bytes, metadata: str | None, expiration: float | None) -> None:
        """Replace the entry under `key` atomically."""

    @abc.abstractmethod
    def _delete(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def _scan(self, prefix: bytes, after: bytes | None, limit: int) -> list[tuple[bytes, Entry]]:
        """Up to `limit` unexpired entries whose key starts with `prefix` and sorts after
        `after`, in byte order (values may be omitted: only metadata and expiration are read)."""

    def purge_expired(self) -> int:
        """Physically remove expired entries (they are already invisible). Returns a count."""
        return 0

    # -- the public API ------------------------------------------------------------

    def get(self, key: str, type: ValueType = "text") -> Any:
        entry = self._read(check_key(key))
        return None if entry is None else decode_value(entry.value, type)

    def get_with_metadata(self, key: str, type: ValueType = "text") -> dict[str, Any]:
        """`{"value": ..., "metadata": ...}`; both None when the key is missing."""
        entry = self._read(check_key(key))
        if entry is None:
            return {"value": None, "metadata": None}
        meta = None if entry.metadata is None else orjson.loads(entry.metadata)
        return {"value": decode_value(entry.value, type), "metadata": meta}

    def put(
        self,
        key: str,
        value: Any,
        expiration: float | None = None,
        expiration_ttl: float | None = None,
        metadata: Any = None,
    ) -> None:
        raw_key = check_key(key)
        data = encode_value(value)
        meta = encode_metadata(metadata)
        expires = resolve_expiration(expiration, expiration_ttl)
        self._write(raw_key, data, meta, expires)

    def delete(self, key: str) -> None:
        self._delete(check_key(key))

    def list(self, prefix: str = "", limit: int = MAX_LIST_LIMIT, cursor: str | None = None) -> dict[str, Any]:
        """`{"keys": [{"name", "expiration"?, "metadata"?}], "list_complete": bool, "cursor": str}`."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValidationError("limit", f"must be an integer in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if not isinstance(prefix, str):
            raise ValidationError("prefix", "must be a string")
        after = decode_cursor(cursor)
        rows = self._scan(prefix.encode("utf-8"), after, limit + 1)
        complete = len(rows) <= limit
        rows = rows[:limit]
        keys = []
        for raw, entry in rows:
            item: dict[str, Any] = {"name": raw.decode("utf-8")}
            if entry.expiration is not None:
                item["expiration"] = int(entry.expiration)
            if entry.metadata is not None:
                item["metadata"] = orjson.loads(entry.metadata)
            keys.append(item)
        return {
            "keys": keys,
            "list_complete": complete,
            "cursor": "" if complete or not rows else encode_cursor(rows[-1][0]),
        }

    def close(self) -> None:
        """Release connections (nothing for backends that share the DB binding)."""
        return None


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`
    (None when there is none: the prefix is empty or all 0xFF)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return None
    return p[:-1] + bytes([p[-1] + 1])
