"""Producers: validate events and enqueue them in batches (`edgepipe ingest`, HTTP).

Validation here is the same as the consumer's, so a bad line is reported to whoever sent
it, with its line number, instead of surfacing later in the DLQ. Valid events are
enqueued one queue message each, in line order, in sends of `SEND_CHUNK`.

The fast path. An NDJSON line is decoded straight into a typed struct (msgspec, checked
in C) holding only the event's own fields, and a send's worth of them is checked in bulk
for the rest of `parse_event`'s rules (time range, common methods, path shape, no NUL):
such a line is enqueued as it is, its bytes the message body (it is JSON of the event's
fields alone: the consumer decodes it as any other body). Anything else — unknown fields,
an RFC 3339 `ts`, a lower-case method, an error to explain — goes through `parse_event`,
which gives the verdict and the message, and its body is re-encoded by the queue. Both
ways accept and refuse the same lines with the same messages; only a body's bytes differ.

Idempotency keys. An event with an `id` keeps it. From a FILE, an event without one gets
`<identity>:<line>`: the first 16 hex digits of the sha256 of the file's content, and its
line number (an array's element number), written into the body. Ingesting the same file
again, in full or resumed, therefore gives every event the same (ts, id) key, and the
consumer's dedup stores each once. From stdin (or a pipe), which cannot be identified
before it is read, an event without an `id` takes the queue message id as before (a
UUIDv7 assigned at enqueue time, which redeliveries keep): reading it twice counts it twice.

Resuming (`Checkpoint`). After each send of a file the producer records, under the file's
identity, the line through which every line was handled (enqueued or rejected); `--resume`
skips the lines up to it. When the queue keeps its messages in the DB binding's database
the checkpoint commits in the send's own transaction, so a kill leaves no send without its
checkpoint. On another queue it is written just after the send: a kill between the two
re-sends that one send on resume, and its events, carrying the same keys, are dropped by
the consumer's (ts, id) dedup. Either way the aggregates count every event exactly once
(while the first copies are still in `traffic_events`: the dedup horizon). A changed file
has another identity, so its old checkpoint is never applied to it.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import chain, dropwhile
from operator import attrgetter
from typing import IO, Annotated, Any, Literal

import ijson
import msgspec
import orjson

from pipeline import clock, meta
from pipeline.bindings.db import Database
from pipeline.bindings.queue import MAX_MESSAGE_BYTES, Queue, encode_body
from pipeline.errors import MessageTooLarge, ValidationError
from pipeline.events import MAX_BYTES, MAX_FUTURE_MS, MAX_ID_LEN, MAX_RESPONSE_TIME_MS, MIN_TS_MS, parse_event
from pipeline.paths import PathNormalizer

SEND_CHUNK = 1000
READ_BLOCK = 1 << 20  # NDJSON is read in blocks of this many bytes and split into lines in C
CHECKPOINT_KEY = "ingest_progress:"  # + the first 32 hex digits of the file's identity, in edgepipe_meta

Progress = Callable[[int], None]


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
    resumed_after: int = 0  # lines up to this one were skipped (`--resume`: the checkpoint)


# -- reading ------------------------------------------------------------------------------


def read_records(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded value or ValidationError) from NDJSON or a JSON array.

    An array is parsed as it streams in (one element in memory at a time) and its elements
    are numbered from 1. When it turns out malformed, the elements before the fault have
    been yielded and the fault is one ValidationError numbered as the next element. Numbers
    decode as `int` or `float`, never Decimal, and an integer is never turned into a float:
    one outside the signed 64-bit range stops the compiled backend's parse there
    (`integer overflow`); the pure-Python backend yields it as an `int`, and one beyond 64
    bits is then refused by the queue's encoder for that event alone (see `ingest`)."""
    for number, value in read_lines(stream):
        if type(value) is not bytes:
            yield number, value
        elif value.strip():
            try:
                yield number, orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                yield number, ValidationError("line", f"malformed JSON: {exc}")


def read_lines(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """What `ingest` reads: (line number, the line's bytes undecoded) from NDJSON, blank
    lines included (without their line ends); from a JSON array, what `read_records`
    yields. NDJSON is read in blocks of `READ_BLOCK` bytes split into lines in C, and
    memory holds one block (or one longer line)."""
    head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
    if head.lstrip().startswith(b"["):
        return _read_array(stream)
    return chain.from_iterable(_ndjson_blocks(stream))


def _ndjson_blocks(stream: IO[bytes]) -> Iterator[Iterator[tuple[int, bytes]]]:
    """The numbered lines of each block of NDJSON (a line split by a block's end is joined)."""
    number, rest = 0, b""
    while block := stream.read(READ_BLOCK):
        lines = (rest + block if rest else block).split(b"\n")
        rest = lines.pop()
        if b"\r" in block:
            lines = [line.rstrip(b"\r") for line in lines]
        yield enumerate(lines, number + 1)
        number += len(lines)
    if rest:
        yield iter([(number + 1, rest.rstrip(b"\r"))])


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


# -- a file's identity and its checkpoint ---------------------------------------------------


def file_identity(stream: IO[bytes]) -> str | None:
    """The sha256 (hex) of the content of `stream` when it is a regular file, read from its
    start; the stream is left at its start. None for anything else (stdin, a pipe), which
    cannot be read twice."""
    try:
        regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not regular or not stream.seekable():
        return None
    stream.seek(0)
    digest = hashlib.file_digest(stream, "sha256").hexdigest()  # type: ignore[arg-type]
    stream.seek(0)
    return digest


class Checkpoint:
    """The durable progress of ingesting one file, in `edgepipe_meta` under
    `ingest_progress:<identity, 32 hex digits>`: the line through which every line was
    handled (enqueued, or rejected) and the sends committed. Written with every send
    (`committing`)."""

    def __init__(self, db: Database, identity: str, with_sends: bool) -> None:
        self.db = db
        self.key = CHECKPOINT_KEY + identity[:32]  # 128 bits; the key column holds 64 characters
        self.with_sends = with_sends  # the queue's sends join the DB binding's transactions

    def load(self) -> int:
        """The line recorded for this file: 0 when none was."""
        with self.db.read() as conn:
            value = meta.get(conn, self.key)
        return int(value) if value else 0

    @contextmanager
    def committing(self, line: int) -> Iterator[None]:
        """Around a send: record `line` once the send is done — in the send's own transaction
        when the queue shares the DB binding's, else in one of its own right after it. A
        send that raises records nothing."""
        if self.with_sends:
            with self.db.transaction() as conn:
                yield
                meta.put_often(self.db, conn, self.key, str(line))
            return
        yield
        with self.db.transaction() as conn:
            meta.put_often(self.db, conn, self.key, str(line))


@dataclass(frozen=True)
class Source:
    """Where `ingest`'s records come from: a file's `identity` (None: stdin or a pipe), its
    `checkpoint`, and the line after which to start (`--resume`; 0: from the first)."""

    identity: str | None = None
    checkpoint: Checkpoint | None = None
    resume_after: int = 0


def open_source(stream: IO[bytes], queue: Queue, db: Database, resume: bool = False, stdin: bool = False) -> Source:
    """Identify `stream` when it is a regular file (not `stdin`) and find where to resume
    it. `resume` on stdin or a pipe is a ValidationError; on a file with no checkpoint it
    starts from the first line."""
    identity = None if stdin else file_identity(stream)
    if identity is None:
        if resume:
            raise ValidationError("--resume", "needs a FILE: stdin or a pipe cannot be resumed")
        return Source()
    checkpoint = Checkpoint(db, identity, queue.shares_transaction)
    return Source(identity, checkpoint, checkpoint.load() if resume else 0)


def ingest_file(
    stream: IO[bytes],
    queue: Queue,
    normalizer: PathNormalizer,
    db: Database,
    resume: bool = False,
    progress: Progress | None = None,
    result: IngestResult | None = None,
    stdin: bool = False,
) -> IngestResult:
    """`edgepipe ingest SOURCE`: `open_source`, then `ingest` its lines. The stream must be
    buffered (`peek`)."""
    source = open_source(stream, queue, db, resume, stdin)
    return ingest(read_lines(stream), queue, normalizer, progress, result, source)


# -- validating and sending -------------------------------------------------------------------


class _Line(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An event line in the common shape, as msgspec decodes it (types and ranges checked
    in C); `_Pending.check` checks the rest of `parse_event`'s rules in bulk. A line this
    does not decode (unknown fields, null or empty `id`/`host`, an RFC 3339 `ts`, any
    error) is judged by `parse_event`."""

    ts: Annotated[int, msgspec.Meta(ge=MIN_TS_MS)]  # and at most 5 minutes ahead: `_Pending.check`
    method: Literal["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]  # the common ones, as they are stored
    path: str
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    response_time_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_RESPONSE_TIME_MS)]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)] | msgspec.UnsetType = msgspec.UNSET
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""
    colo: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] | None = None


_decode_line = msgspec.json.Decoder(_Line).decode
_TS, _PATH = attrgetter("ts"), attrgetter("path")
_NUL_ESCAPE = b"\\u0000"  # JSON holds a NUL only escaped (a raw control character is malformed)


def _joined(bodies: list[Any]) -> bytes:
    """The fast lines among `bodies` (`msgspec.Raw`), joined."""
    try:
        return b"".join(bodies)
    except TypeError:  # a body off the fast path (a dict) among them
        return b"".join(b for b in bodies if type(b) is msgspec.Raw)


class _Pending:
    """The events of the next send, in line order: `bodies` (a fast line's bytes as
    `msgspec.Raw`, or the value `parse_event` accepted), their line `numbers`, and `fast`
    (a fast line's decoded `_Line`, None for the others). Those from `checked` on still
    await the bulk check."""

    def __init__(self, normalizer: PathNormalizer) -> None:
        self.normalizer = normalizer
        self.bodies: list[Any] = []
        self.numbers: list[int] = []
        self.fast: list[_Line | None] = []
        self.checked = 0

    def check(self, now_ms: int, result: IngestResult, fallback: Callable[[int], str]) -> None:
        """The rest of `parse_event`'s rules over the fast lines not yet checked, in bulk;
        a line that fails them is judged by `parse_event` alone (kept, or rejected with its
        reason), which is rare."""
        start, self.checked = self.checked, len(self.bodies)
        lines: list[_Line] = list(filter(None, self.fast[start:]))
        if not lines or self._all_common(lines, start, now_ms):
            return
        keep = list(range(start))
        for i in range(start, len(self.bodies)):
            ev, body = self.fast[i], self.bodies[i]
            if ev is not None and not self._common(ev, body, now_ms):
                try:
                    parse_event(orjson.loads(bytes(body)), self.normalizer, now_ms, fallback(self.numbers[i]))
                except ValidationError as exc:
                    bisect.insort(result.rejected, (self.numbers[i], str(exc)))
                    continue
            keep.append(i)
        if len(keep) < len(self.bodies):
            self.keep(keep)

    def keep(self, positions: list[int]) -> None:
        """Keep only the events at `positions` (increasing), all of them checked."""
        self.bodies[:] = [self.bodies[i] for i in positions]
        self.numbers[:] = [self.numbers[i] for i in positions]
        self.fast[:] = [self.fast[i] for i in positions]
        self.checked = len(self.bodies)

    def _all_common(self, lines: list[_Line], start: int, now_ms: int) -> bool:
        paths = list(map(_PATH, lines))
        return (
            max(map(_TS, lines)) <= now_ms + MAX_FUTURE_MS
            and max(map(len, paths)) <= self.normalizer.cfg.max_length
            and "/" <= min(paths) <= max(paths) < "0"  # all start with "/" (the character before "0")
            and _NUL_ESCAPE not in _joined(self.bodies[start:])
        )

    def _common(self, ev: _Line, body: msgspec.Raw, now_ms: int) -> bool:
        return (
            ev.ts <= now_ms + MAX_FUTURE_MS
            and len(ev.path) <= self.normalizer.cfg.max_length
            and ev.path.startswith("/")
            and (_NUL_ESCAPE not in bytes(body) or "\x00" not in f"{ev.id or ''}{ev.path}{ev.host}{ev.colo or ''}")
        )

    def clear(self) -> None:
        self.bodies.clear()
        self.numbers.clear()
        self.fast.clear()
        self.checked = 0


def ingest(
    records: Iterable[tuple[int, Any]],
    queue: Queue,
    normalizer: PathNormalizer,
    progress: Progress | None = None,
    result: IngestResult | None = None,
    source: Source | None = None,
) -> IngestResult:
    """Validate `records` and enqueue the valid events, each its own message, in sends of
    `SEND_CHUNK`. A record is (line number, value): the line's undecoded bytes (decoded
    here: the fast path, see the module docstring), a decoded JSON value, or the
    ValidationError a reader met. An event the queue cannot take as a message (larger than
    the message limit, or not serialisable) is rejected alone and the rest of its send goes on.

    `source` (`open_source`): a file's identity gives an event without an id
    `<identity[:16]>:<line>` (else it takes the queue message id), its checkpoint records
    the progress with each send (and at the end), and lines up to `resume_after` are skipped.

    When the queue fails (BindingError, …) the exception propagates; `result`, when the
    caller passed one, then holds what was enqueued before the failure: `enqueued` events
    through line `last_line` (a send is all or nothing)."""
    result = IngestResult() if result is None else result
    source = Source() if source is None else source
    identity, checkpoint, resume_after = source.identity, source.checkpoint, source.resume_after
    result.resumed_after = resume_after
    prefix = f"{identity[:16]}:" if identity else None
    raw_prefix = b'{"id":"' + prefix.encode() if prefix else b""

    def fallback(number: int) -> str:
        return f"{prefix}{number}" if prefix else "-"

    pending = _Pending(normalizer)
    bodies, numbers, fast = pending.bodies, pending.numbers, pending.fast
    decode, unset, raw, limit = _decode_line, msgspec.UNSET, msgspec.Raw, MAX_MESSAGE_BYTES - 64  # room for an id
    now_ms = clock.now_ms()
    number = sent = resume_after
    if resume_after:
        records = dropwhile(lambda record: record[0] <= resume_after, records)
    for number, value in records:
        if type(value) is bytes:
            try:
                ev: _Line | None = decode(value)
            except msgspec.DecodeError:
                ev = None
            if ev is not None and len(value) <= limit:
                if ev.id is unset and prefix is not None:  # the line's key: written into the body
                    value = b'%s%d",%s' % (raw_prefix, number, value[value.index(b"{") + 1 :])
                    ev.id = ""  # judged without it, as `parse_event` would with its fallback
                bodies.append(raw(value))
                numbers.append(number)
                fast.append(ev)
                if len(bodies) >= SEND_CHUNK:
                    pending.check(now_ms, result, fallback)
                    if len(bodies) >= SEND_CHUNK:
                        sent = _send(queue, pending, result, progress, checkpoint, number)
                        now_ms = clock.now_ms()
                continue
            if not value.strip():
                continue  # a blank line
        try:
            body = _judge(value, normalizer, now_ms, fallback(number), prefix is not None)
        except ValidationError as exc:
            result.rejected.append((number, str(exc)))
            continue
        bodies.append(body)
        numbers.append(number)
        fast.append(None)
        if len(bodies) >= SEND_CHUNK:
            pending.check(now_ms, result, fallback)
            if len(bodies) >= SEND_CHUNK:
                sent = _send(queue, pending, result, progress, checkpoint, number)
                now_ms = clock.now_ms()
    pending.check(now_ms, result, fallback)
    if bodies or (checkpoint is not None and number > sent):
        _send(queue, pending, result, progress, checkpoint, number)
    return result


def _judge(value: Any, normalizer: PathNormalizer, now_ms: int, fallback_id: str, keyed: bool) -> Any:
    """The body to enqueue for a record off the fast path, or the ValidationError that
    rejects it. With `keyed`, an event without an id gets `fallback_id` in its body."""
    if isinstance(value, ValidationError):
        raise value
    if type(value) is bytes:
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValidationError("line", f"malformed JSON: {exc}") from None
    event = parse_event(value, normalizer, now_ms, fallback_id)
    if keyed and event.id == fallback_id:
        value["id"] = fallback_id
    return value


def _send(
    queue: Queue,
    pending: _Pending,
    result: IngestResult,
    progress: Progress | None,
    checkpoint: Checkpoint | None,
    through: int,
) -> int:
    """Send the pending events, recording `through` in the checkpoint with the send (with
    nothing to send, only the checkpoint); returns `through`."""
    commit: Callable[[], AbstractContextManager[None]] = (
        (lambda: checkpoint.committing(through)) if checkpoint is not None else nullcontext
    )
    while True:
        messages = pending.bodies
        try:
            with commit():
                if messages:
                    queue.send_batch(messages)
            break
        except ValidationError:
            # The queue refuses the whole send when one body cannot be a message. Rare, so
            # only now is each event encoded again (as the queue does) to find and reject those.
            if not _reject_unsendable(pending, result):
                raise
    n = len(messages)
    if n:
        result.enqueued += n
        result.last_line = pending.numbers[-1]
        if progress:
            progress(n)
    pending.clear()
    return through


def _reject_unsendable(pending: _Pending, result: IngestResult) -> bool:
    """Remove from `pending` the events `encode_body` refuses, rejecting each with its line
    number; False when there was none."""
    keep: list[int] = []
    for i, value in enumerate(pending.bodies):
        try:
            encode_body(value)
        except MessageTooLarge:
            reason = f"event: larger than the {MAX_MESSAGE_BYTES}-byte message limit"
        except ValidationError as exc:
            reason = f"event: {exc.reason}"
        else:
            keep.append(i)
            continue
        bisect.insort(result.rejected, (pending.numbers[i], reason))  # validation rejected later lines already
    if len(keep) == len(pending.bodies):
        return False
    pending.keep(keep)
    return True
