"""Producers: validate events and enqueue them in batches (`edgepipe ingest`, HTTP).

Validation here is the same as the consumer's, so a bad line is reported to whoever sent
it, with its line number, instead of surfacing later in the DLQ. Valid events are
enqueued unchanged; an event without `id` gets the queue message id (a UUIDv7 assigned at
enqueue time) as its idempotency key, which redeliveries keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from pipeline import clock
from pipeline.bindings.queue import Queue
from pipeline.errors import ValidationError
from pipeline.events import parse_event
from pipeline.paths import PathNormalizer

SEND_CHUNK = 1000


@dataclass
class IngestResult:
    enqueued: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def read_records(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded value or ValidationError) from NDJSON or a JSON array."""
    head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
    if head.lstrip().startswith(b"["):
        try:
            values = orjson.loads(stream.read())
        except orjson.JSONDecodeError as exc:
            yield 1, ValidationError("body", f"malformed JSON array: {exc}")
            return
        yield from enumerate(values, start=1)
        return
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, ValidationError("line", f"malformed JSON: {exc}")


def ingest(
    records: Iterable[tuple[int, Any]],
    queue: Queue,
    normalizer: PathNormalizer,
    progress: Callable[[int], None] | None = None,
) -> IngestResult:
    result = IngestResult()
    pending: list[Any] = []
    now_ms = clock.now_ms()
    for number, value in records:
        try:
            if isinstance(value, ValidationError):
                raise value
            parse_event(value, normalizer, now_ms, fallback_id="-")
        except ValidationError as exc:
            result.rejected.append((number, str(exc)))
            continue
        pending.append(value)
        if len(pending) >= SEND_CHUNK:
            result.enqueued += _flush(queue, pending, progress)
            now_ms = clock.now_ms()
    result.enqueued += _flush(queue, pending, progress)
    return result


def _flush(queue: Queue, pending: list[Any], progress: Callable[[int], None] | None) -> int:
    n = len(pending)
    if n:
        queue.send_batch(pending)
        pending.clear()
        if progress:
            progress(n)
    return n
