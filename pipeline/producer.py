"""Producers: validate events and enqueue them in batches (`edgepipe ingest`, HTTP).

Validation here is the same as the consumer's, so a bad line is reported to whoever sent
it, with its line number, instead of surfacing later in the DLQ. Valid events are
enqueued unchanged, one queue message each; an event without `id` gets the queue message
id (a UUIDv7 assigned at enqueue time) as its idempotency key, which redeliveries keep.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import ijson
import orjson

from pipeline import clock
from pipeline.bindings.queue import MAX_MESSAGE_BYTES, Queue, encode_body
from pipeline.errors import MessageTooLarge, ValidationError
from pipeline.events import parse_event
from pipeline.paths import PathNormalizer

SEND_CHUNK = 1000


def _ijson_backend() -> Any:
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:  # no compiled backend for this platform: ijson's best available one
        return ijson


IJSON = _ijson_backend()


@dataclass
class IngestResult:
    enqueued: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), in line order
    last_line: int = 0  # the line number of the last enqueued event (0: none yet)


def read_records(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded value or ValidationError) from NDJSON or a JSON array.

    An array is parsed as it streams in (one element in memory at a time) and its elements
    are numbered from 1. When it turns out malformed, the elements before the fault have
    been yielded and the fault is one ValidationError numbered as the next element. Numbers
    decode as `int` or `float`, never Decimal, and an integer is never turned into a float:
    one outside the signed 64-bit range stops the compiled backend's parse there
    (`integer overflow`); the pure-Python backend yields it as an `int`, and one beyond 64
    bits is then refused by the queue's encoder for that event alone (see `ingest`)."""
    head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
    if head.lstrip().startswith(b"["):
        yield from _read_array(stream)
        return
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, ValidationError("line", f"malformed JSON: {exc}")


def _read_array(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    number = 0
    try:
        for number, value in enumerate(IJSON.items(stream, "item", use_float=True), start=1):
            yield number, value
    except ijson.JSONError as exc:
        yield number + 1, ValidationError("body", f"malformed JSON array: {_parse_error(exc)}")


def _parse_error(exc: Exception) -> str:
    """The first line of a parser error (yajl appends the input around the fault and a caret)."""
    detail = exc.args[0] if exc.args else ""
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", errors="replace")
    detail = str(detail).strip()
    first = detail.splitlines()[0].rstrip(".") if detail else type(exc).__name__
    if "integer overflow" in first:
        first += " (an integer outside the signed 64-bit range)"
    return first


def ingest(
    records: Iterable[tuple[int, Any]],
    queue: Queue,
    normalizer: PathNormalizer,
    progress: Callable[[int], None] | None = None,
    result: IngestResult | None = None,
) -> IngestResult:
    """Validate `records` and enqueue the valid events, each its own message, in sends of
    `SEND_CHUNK`. An event the queue cannot take as a message (larger than the message
    limit, or not serialisable) is rejected alone and the rest of its send goes on.

    When the queue fails (BindingError, …) the exception propagates; `result`, when the
    caller passed one, then holds what was enqueued before the failure: `enqueued` events
    through line `last_line` (a send is all or nothing)."""
    result = IngestResult() if result is None else result
    pending: list[Any] = []
    numbers: list[int] = []
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
        numbers.append(number)
        if len(pending) >= SEND_CHUNK:
            _flush(queue, pending, numbers, result, progress)
            now_ms = clock.now_ms()
    _flush(queue, pending, numbers, result, progress)
    return result


def _flush(
    queue: Queue,
    pending: list[Any],
    numbers: list[int],
    result: IngestResult,
    progress: Callable[[int], None] | None,
) -> None:
    if not pending:
        return
    try:
        queue.send_batch(pending)
    except ValidationError:
        # The queue refuses the whole send when one body cannot be a message. Rare, so only
        # now is each event encoded again (as the queue does) to find and reject those.
        if not _reject_unsendable(pending, numbers, result):
            raise
        if pending:
            queue.send_batch(pending)
    n = len(pending)
    if n:
        result.enqueued += n
        result.last_line = numbers[-1]
        if progress:
            progress(n)
    pending.clear()
    numbers.clear()


def _reject_unsendable(pending: list[Any], numbers: list[int], result: IngestResult) -> bool:
    """Remove from `pending` (and `numbers`) the events `encode_body` refuses, rejecting
    each with its line number; False when there was none."""
    keep: list[int] = []
    for i, value in enumerate(pending):
        try:
            encode_body(value)
        except MessageTooLarge:
            reason = f"event: larger than the {MAX_MESSAGE_BYTES}-byte message limit"
        except ValidationError as exc:
            reason = f"event: {exc.reason}"
        else:
            keep.append(i)
            continue
        bisect.insort(result.rejected, (numbers[i], reason))  # validation rejected later lines already
    if len(keep) == len(pending):
        return False
    pending[:] = [pending[i] for i in keep]
    numbers[:] = [numbers[i] for i in keep]
    return True
