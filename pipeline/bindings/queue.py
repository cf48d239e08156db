"""The QUEUE binding, with Cloudflare Queues semantics.

Producers call `send(body)` / `send_batch(bodies)`. A consumer `receive`s a batch (up to
`max_batch_size` messages, waiting at most `max_batch_timeout` for it to fill); every
received message is leased for `visibility_timeout` seconds and becomes visible again if
the consumer dies. The handler decides per message: `ack()`, `retry(delay_seconds=)`, or
`dead_letter(reason)` (poison: straight to the DLQ, no retries). The first explicit
decision on a message wins. A message whose body is a JSON array of items can also send
single items to the DLQ (`dead_letter_part`) and ack the rest. The worker loop then calls `settle(batch, failure)`:

* success (`failure is None`): undecided messages are acked;
* failure (the handler or the commit raised): the batch's DB writes rolled back, so an
  `ack()` made before the failure is void too; dead-lettered messages (poison, which wrote
  nothing) go to the DLQ and every other message is retried with `failure` as its last
  error. This is stricter than Cloudflare, where acks survive a throw, and it is what
  keeps one transaction per batch exactly-once.

A retried message whose deliveries exceed `1 + max_retries` moves to the DLQ with its
last error. Backends whose `shares_transaction` is true keep their messages in the DB
binding's database: `settle` then runs inside the batch's DB transaction, so event rows,
aggregates and acks commit as one.

Dead letters can be listed, redriven and purged by reason and age. Every dead letter is
also counted for good per reason (`rejected_totals`), in the transaction that stores it:
`rejected` means events failed for good since deployment, whether still in the DLQ or
purged since. A redriven letter goes back to be processed, so it is no longer a failure and
leaves the count (it enters it again if it fails again); a purge leaves the count alone.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import orjson

from pipeline.errors import MessageTooLarge, ValidationError

MAX_MESSAGE_BYTES = 128 * 1024


class DeadReason(StrEnum):
    """Why a message is in the DLQ (its `reason`; the `error` column has the detail)."""

    INVALID = "invalid"  # the validator refused it, naming the field
    TOO_LATE = "too_late"  # older than the archive watermark
    POISON = "poison"  # it failed alone, in a transaction of its own, on a value the database refuses
    RETRIES = "retries_exhausted"  # it failed 1 + max_retries deliveries


REASON_INVALID, REASON_TOO_LATE, REASON_RETRIES = DeadReason.INVALID, DeadReason.TOO_LATE, DeadReason.RETRIES


def parse_reason(value: str | None, name: str = "reason") -> DeadReason | None:
    """`value` as a `DeadReason` (None stays None); any other code is a ValidationError
    naming `name` and the valid codes."""
    if value is None:
        return None
    try:
        return DeadReason(value)
    except ValueError:
        valid = ", ".join(r.value for r in DeadReason)
        raise ValidationError(name, f"{value!r} is not a dead-letter reason (one of {valid})") from None


class DeadLetter(msgspec.Struct, frozen=True):
    """Why a message (or one element of it) goes to the DLQ: a reason code and the detail."""

    reason: DeadReason
    error: str = ""


def encode_body(body: Any) -> tuple[bytes, str]:
    """Serialise a body like Cloudflare's content types: json (default), text or bytes.
    JSON already encoded, as `msgspec.Raw` or `orjson.Fragment` (a producer that checked
    it), is stored as it is."""
    if type(body) is msgspec.Raw:
        data, kind = bytes(body), "json"
    elif isinstance(body, bytes | bytearray | memoryview):
        data, kind = bytes(body), "bytes"
    elif isinstance(body, str):
        data, kind = body.encode("utf-8"), "text"
    else:
        try:
            data, kind = orjson.dumps(body), "json"
        except TypeError as exc:
            raise ValidationError("body", f"not JSON-serialisable: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge("body", f"{len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return data, kind


def decode_body(data: bytes, kind: str) -> Any:
    if kind == "json":
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValidationError("body", f"malformed JSON: {exc}") from None
    if kind == "text":
        return data.decode("utf-8", errors="replace")
    return data


_UNDECODED: Any = object()


class Message(msgspec.Struct):  # a Struct: built a thousand times per batch, in C
    id: str
    enqueued_at: float  # epoch seconds
    attempts: int  # this delivery's number, 1 on the first
    raw: bytes  # the body as stored; `body` decodes it
    content_type: str = "json"  # "json" | "text" | "bytes"
    handle: Any = None  # backend-specific (row key, stream id)
    decision: str | None = None  # "ack" | "retry" | "dead"
    delay: float | None = None
    dead: DeadLetter | None = None  # why, when the decision is "dead"
    dead_parts: list[tuple[int, DeadLetter]] | None = None  # array elements for the DLQ, by index
    _body: Any = _UNDECODED

    @property
    def body(self) -> Any:
        """The body, decoded on first read: a JSON value, a str or bytes, as sent. A stored
        JSON body that does not parse (written by a foreign or corrupt producer) raises
        ValidationError("body", "malformed JSON: …"); a handler dead-letters it. Handlers
        with a typed decoder of their own may read `raw` instead and skip this step."""
        if self._body is _UNDECODED:
            self._body = decode_body(self.raw, self.content_type)
        return self._body

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.enqueued_at, UTC)

    def ack(self) -> None:
        if self.decision is None:
            self.decision = "ack"

    def retry(self, delay_seconds: float | None = None) -> None:
        if self.decision is None:
            self.decision, self.delay = "retry", delay_seconds

    def dead_letter(self, reason: str, error: str = "") -> None:
        """Send straight to the DLQ (poison); `reason` is a `DeadReason` (ValueError for any other
        code), `error` the detail."""
        if self.decision is None:
            self.decision, self.delay, self.dead = "dead", None, DeadLetter(DeadReason(reason), error)

    def dead_letter_part(self, index: int, reason: str, error: str = "") -> None:
        """Send element `index` of a JSON array body alone to the DLQ, as the dead letter
        `<id>:<index>`, when the message is acked; the rest of the message is the
        handler's. (A message whose batch fails is retried whole: its parts wait.)"""
        if self.dead_parts is None:
            self.dead_parts = []
        self.dead_parts.append((index, DeadLetter(DeadReason(reason), error)))


@dataclass(slots=True)
class MessageBatch:
    queue: str
    messages: list[Message] = field(default_factory=list)
    lease: str = ""
    taken_at: float | None = None  # when taken inside a transaction (the take's "now")
    # The transaction that took the messages by deleting them (the SQL queue on PostgreSQL):
    # while it is open, the batch's rows are gone and a settle writes back only what stays.
    taken_in: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    def ack_all(self) -> None:
        for m in self.messages:
            m.ack()

    def retry_all(self, delay_seconds: float | None = None) -> None:
        for m in self.messages:
            m.retry(delay_seconds)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_retries: int = 3
    retry_delay: float = 0.0
    visibility_timeout: float = 30.0


@dataclass(slots=True)
class Decisions:
    """A batch's messages by what `settle` does with them (the rules of the module docstring)."""

    acks: list[Message] = field(default_factory=list)  # acked, including those in `parts`
    parts: list[Message] = field(default_factory=list)  # acked, with array elements for the DLQ
    retries: list[tuple[Message, float]] = field(default_factory=list)  # and the delay before the next delivery
    dead: list[tuple[Message, str, str]] = field(default_factory=list)  # and the reason, the error


def decide(messages: Iterable[Message], failure: str | None, settings: QueueSettings) -> Decisions:
    """Apply the settle rules to each message: undecided ones are acked; after a failure
    acks are void (retried) and dead letters stay dead; a retry past `1 + max_retries`
    deliveries is dead as `retries_exhausted` with the last error."""
    out = Decisions()
    limit = 1 + settings.max_retries
    for m in messages:
        decision = m.decision or "ack"
        if failure is not None and decision != "dead":
            decision = "retry"  # the batch's writes rolled back: acks are void
        if decision == "ack":
            out.acks.append(m)
            if m.dead_parts:
                out.parts.append(m)
        elif decision == "dead":
            out.dead.append((m, m.dead.reason, m.dead.error) if m.dead else (m, REASON_INVALID, ""))
        elif m.attempts >= limit:
            last = failure or "retried by the consumer"
            out.dead.append((m, REASON_RETRIES, f"{m.attempts} deliveries; last error: {last}"))
        else:
            out.retries.append((m, settings.retry_delay if m.delay is None else m.delay))
    return out


class Queue(abc.ABC):
    """One named queue. Implementations must be safe for several consumer processes."""

    name: str
    settings: QueueSettings
    shares_transaction: bool = False

    @abc.abstractmethod
    def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        """Enqueue bodies durably (all or nothing); returns their message ids."""

    def send(self, body: Any) -> str:
        return self.send_batch([body])[0]

    @abc.abstractmethod
    def receive(self, max_messages: int, wait_seconds: float = 0.0) -> MessageBatch:
        """Lease up to `max_messages` visible messages, waiting up to `wait_seconds` for the
        batch to fill. Returns a possibly empty batch. A backend that shares the DB
        binding's transaction may, when called inside one, claim the messages in that
        transaction instead of leasing them (see `wait`)."""

    def wait(self, max_messages: int, wait_seconds: float) -> None:
        """Block until `max_messages` are visible or `wait_seconds` passed. The worker calls
        it outside its transaction, then `receive(…, 0)` inside; backends whose `receive`
        waits by itself need not override it."""
        return None

    @abc.abstractmethod
    def settle(self, batch: MessageBatch, failure: str | None = None) -> None:
        """Apply the batch's decisions (see the module docstring)."""

    def retake(self, batch: MessageBatch) -> MessageBatch:
        """The messages of `batch` (part of a batch whose transaction failed) as a fresh
        batch with no decision taken, to be handled again: the worker splits a failed batch
        to find its poison. Backends that share the DB binding's transaction take them again
        inside the caller's transaction (those still waiting; another consumer may have
        taken some meanwhile); the others still hold them under the batch's lease."""
        fresh = [msgspec.structs.replace(m, decision=None, delay=None, dead=None, dead_parts=None) for m in batch]
        return MessageBatch(batch.queue, fresh, batch.lease, batch.taken_at)

    def take_ahead(self, on: bool) -> None:  # noqa: B027 (a hint: most backends have nothing to gain)
        """A hint from the handler: while `on`, the batches to come will probably cost the
        database little beside their take (a backlog delivered again, all duplicates), so
        after a full batch take the next at once, if this backend can, while that one is
        handled. Changes when batches are taken, never what is delivered."""

    def ensure(self) -> None:  # noqa: B027 (the db queue's tables come with the schema)
        """Create what this queue needs on its server when missing (an SQS queue and its
        `-dlq`, a Redis stream's consumer group); idempotent. `edgepipe init` calls it."""

    def close(self) -> None:  # noqa: B027 (the db queue shares the DB binding's engine)
        """Release this binding's own connections."""

    def release(self, batch: MessageBatch) -> None:  # noqa: B027 (nothing to do for most backends)
        """Make a leased batch's messages visible again at once without counting the
        delivery (a transient fault stopped the consumer, not the messages). Messages
        already settled are left alone."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """`{"pending": n, "in_flight": n, "dlq": n}` plus `dlq_<reason>` counts."""

    @abc.abstractmethod
    def oldest_age_s(self) -> float:
        """Consumer lag: seconds since the oldest message still in the queue was enqueued
        (0 when empty)."""

    def dlq_counts(self) -> dict[str, int]:
        """Dead letters per reason."""
        return {k.removeprefix("dlq_"): v for k, v in self.stats().items() if k.startswith("dlq_")}

    def depth_estimate(self, limit: int) -> tuple[int, bool]:
        """(depth, True), or (an upper bound of it, False) when a backend can bound the depth
        more cheaply than it counts and the bound is within `limit`: what HTTP backpressure
        asks many times a second."""
        return self.depth(), True

    # The DLQ operations below take the same filters: `reason` (a `DeadReason` code; any
    # other is a ValidationError) and `before` (epoch seconds: letters that failed earlier,
    # `failed_at < before`). No filter selects every letter of this queue.

    @abc.abstractmethod
    def dlq_list(
        self, limit: int = 100, reason: str | None = None, before: float | None = None
    ) -> list[dict[str, Any]]:
        """Dead letters, oldest first: message_id, attempts, reason, error, failed_at, body."""

    @abc.abstractmethod
    def dlq_redrive(self, limit: int | None = None, reason: str | None = None, before: float | None = None) -> int:
        """Move dead letters (oldest first, at most `limit`) back to the queue with a fresh
        attempt count; returns how many. They leave `rejected_totals` in the same
        transaction: a redriven letter is to be processed again, no longer a failure."""

    @abc.abstractmethod
    def dlq_purge(self, reason: str | None = None, before: float | None = None) -> int:
        """Delete dead letters for good; returns how many. `rejected_totals` keeps counting
        them. With no filter, every letter of this queue goes."""

    @abc.abstractmethod
    def rejected_totals(self) -> dict[str, int]:
        """The lasting count of messages dead-lettered on this queue, per reason: every
        `DeadReason` code is present (zeros included). Letters are counted in the
        transaction that stores them and stay counted when purged; redriven ones leave it."""

    def depth(self) -> int:
        s = self.stats()
        return s["pending"] + s["in_flight"]
