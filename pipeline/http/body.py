"""Reading and validating a `POST /v1/events` body.

Limits are enforced while the body streams in, before anything is parsed: the raw size,
for `Content-Encoding: gzip` the decompressed size (a small gzip bomb must not become a
large allocation), and the time the whole body takes to arrive (`[http] body_timeout`: a
client that trickles or stalls its body gets 408 instead of holding a request open). Each
event is validated with `pipeline.events.parse_event`, the same rules the consumer
applies, so a bad event is reported to its sender instead of surfacing later in the DLQ;
the accepted ones leave as queue message bodies (`validate`).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from pipeline.bindings.queue import MAX_MESSAGE_BYTES
from pipeline.errors import ValidationError
from pipeline.events import parse_event
from pipeline.http.enqueue import pack
from pipeline.ids import uuid7_batch
from pipeline.paths import PathNormalizer

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/jsonlines",
        "application/x-jsonlines",
    }
)
ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip"})


class BodyError(Exception):
    """A request body refused as a whole: nothing of it is enqueued."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def body_kind(content_type: str | None) -> str:
    """`json` or `ndjson` from the Content-Type header; 415 for anything else."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES:
        return "json"
    if media in NDJSON_TYPES:
        return "ndjson"
    shown = media or "none"
    raise BodyError(
        415, "unsupported_media_type", f"Content-Type {shown!r}: send application/json or application/x-ndjson"
    )


def check_encoding(content_encoding: str | None) -> bool:
    """True when the body is gzip-compressed; 415 for an encoding other than gzip/identity."""
    enc = (content_encoding or "").strip().lower()
    if enc not in ENCODINGS:
        raise BodyError(415, "unsupported_media_type", f"Content-Encoding {enc!r}: only gzip and identity are accepted")
    return enc in ("gzip", "x-gzip")


def _too_large(limit: int, what: str) -> BodyError:
    return BodyError(413, "payload_too_large", f"{what} exceeds max_body_bytes ({limit} bytes)")


class _Gunzip:
    """Incremental gzip decoding (multi-member streams too) that never yields more than `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._d = zlib.decompressobj(wbits=31)

    def feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            try:
                data = self._d.decompress(chunk, self.limit + 1 - self.size)
            except zlib.error as exc:
                raise BodyError(400, "malformed_body", f"body: invalid gzip data: {exc}") from None
            self.size += len(data)
            if self.size > self.limit or self._d.unconsumed_tail:
                raise _too_large(self.limit, "decompressed body")
            out.append(data)
            chunk = b""
            if self._d.eof and self._d.unused_data:  # the next gzip member
                chunk, self._d = self._d.unused_data, zlib.decompressobj(wbits=31)
        return b"".join(out)

    def finish(self) -> None:
        if not self._d.eof:
            raise BodyError(400, "malformed_body", "body: truncated gzip stream")


async def read_body(stream: AsyncIterator[bytes], gzipped: bool, limit: int, timeout: float | None = None) -> bytes:
    """The (decompressed) body, or BodyError 413 as soon as a limit is crossed, or 408 when
    the whole body has not arrived within `timeout` seconds."""
    if timeout is None:
        return await _read_body(stream, gzipped, limit)
    try:
        with anyio.fail_after(timeout):
            return await _read_body(stream, gzipped, limit)
    except TimeoutError:
        raise BodyError(408, "request_timeout", f"body not received within body_timeout ({timeout:g} s)") from None


async def _read_body(stream: AsyncIterator[bytes], gzipped: bool, limit: int) -> bytes:
    parts: list[bytes] = []
    raw = 0
    gunzip = _Gunzip(limit) if gzipped else None
    async for chunk in stream:
        raw += len(chunk)
        if raw > limit:
            raise _too_large(limit, "body")
        parts.append(gunzip.feed(chunk) if gunzip else chunk)
    if gunzip:
        gunzip.finish()
    return b"".join(parts)


def decode(data: bytes, kind: str, max_events: int) -> list[Any]:
    """Decoded records; an NDJSON line that is not JSON becomes a ValidationError in place."""
    if kind == "json":
        try:
            values = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, "malformed_body", f"body: malformed JSON: {exc}") from None
        if not isinstance(values, list):
            raise BodyError(400, "malformed_body", "body: must be a JSON array of events")
    else:
        lines = [line for line in data.split(b"\n") if line.strip()]
        if len(lines) > max_events:
            raise _too_many(len(lines), max_events)
        values = []
        for number, line in enumerate(lines):
            try:
                values.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                values.append(ValidationError("event", f"malformed JSON on non-empty line {number + 1}: {exc}"))
    if len(values) > max_events:
        raise _too_many(len(values), max_events)
    return values


def _too_many(n: int, limit: int) -> BodyError:
    return BodyError(413, "payload_too_large", f"{n} events exceed max_events_per_request ({limit})")


@dataclass
class Checked:
    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)  # the accepted events as queue message bodies


def validate(values: list[Any], normalizer: PathNormalizer, now_ms: int) -> Checked:
    """Split records into accepted and rejected ({index, field, error}). Accepted events are
    forwarded unchanged (like `edgepipe ingest`) except that one without an `id` gets a
    UUIDv7 now, at enqueue time, so a redelivery or a retried post keeps it; they are packed
    into JSON-array message bodies, and an event too large for a message alone is rejected."""
    accepted: list[Any] = []
    rejected: list[dict[str, Any]] = []
    fresh: Iterator[str] | None = None
    for index, value in enumerate(values):
        try:
            if isinstance(value, ValidationError):
                raise value
            parse_event(value, normalizer, now_ms, fallback_id="-")
        except ValidationError as exc:
            rejected.append(_rejection(index, exc))
            continue
        if not value.get("id"):
            if fresh is None:  # one batch of ids, enough for the rest of the body
                fresh = iter(uuid7_batch(len(values) - index))
            value["id"] = next(fresh)
        accepted.append(value)
    messages, too_large = pack(accepted)
    if too_large:
        refused = {r["index"] for r in rejected}
        kept = [i for i in range(len(values)) if i not in refused]
        error = ValidationError("event", f"larger than the {MAX_MESSAGE_BYTES}-byte message limit")
        rejected = sorted(rejected + [_rejection(kept[p], error) for p in too_large], key=lambda r: r["index"])
    return Checked(len(accepted) - len(too_large), rejected, messages)


def _rejection(index: int, exc: ValidationError) -> dict[str, Any]:
    return {"index": index, "field": exc.field, "error": str(exc)}
