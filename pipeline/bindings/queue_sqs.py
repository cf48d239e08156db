"""QUEUE backend on Amazon SQS (or an SQS-compatible server): `sqs://QUEUE_NAME?region=…&endpoint_url=…`.

Two standard queues: QUEUE_NAME and `QUEUE_NAME-dlq`, which `ensure` (`edgepipe init`)
creates with SQS's longest retention, 14 days; a missing one is a BindingError asking for
`edgepipe init`. No redrive policy: edgepipe moves dead letters itself, with their reason.
Credentials come from the standard AWS chain; botocore tries a failed call 3 times, and
what still fails is a TransientError (throttling, 5xx, the network) or a BindingError.
How the contract (queue.py) maps to SQS:

* Envelope: message attributes carry edgepipe's message id (UUIDv7, the same across
  redeliveries, retries and redrives: an event without an id takes it as its own), the
  content type, enqueued_at (edgepipe's clock), the deliveries before this copy
  (`attempts`) and `encoding` for a body SQS cannot carry as text (bytes, characters
  outside its set: base64). A foreign message (no attributes) is JSON, its id SQS's.
* `send_batch`: every body is encoded first (too large or unserialisable: nothing is
  sent), then SendMessageBatch in requests of ≤ 10 entries and ≤ 256 KiB; failed entries
  are sent again with the same ids, and the send raises if they still fail (requests
  already sent stay enqueued: a server failing halfway is not all or nothing).
* `receive`: ReceiveMessage pages of ≤ 10 (visibility: `visibility_timeout` in whole
  seconds) until the batch is full or `wait_seconds` passed: long polls of the whole
  seconds left (≤ 20), short polls when none are. `attempts` = the attribute +
  ApproximateReceiveCount. The batch's lease starts when its first page came: a settle or
  release after `visibility_timeout` applies nothing, since SQS may have handed the
  messages to another consumer meanwhile and a stale receipt handle must not delete or
  move that delivery. They come back and are handled again, so keep `visibility_timeout`
  well above the time a batch takes.
* `settle`: dead letters (and `dead_letter_part` elements, `<id>:<index>`) are sent to the
  `-dlq` with reason, error, attempts and failed_at attributes, then counted for good in
  the DB binding's `counters` (`dlq_total.<queue>.<reason>`, like the db queue); retried
  messages are sent again with their delay as DelaySeconds (whole seconds, rounded up) and
  their deliveries so far as `attempts`; then the acked, dead and re-sent messages are
  deleted. Sending a retry again, rather than hiding it, keeps it pending (not in flight)
  and brings it back when its delay ends; a delay beyond DelaySeconds' 15 minutes is a
  ChangeMessageVisibility instead (in flight meanwhile, at most 12 hours).
* `release`: ChangeMessageVisibility 0. SQS cannot take a receive back, so here a released
  delivery counts toward `max_retries` (a long DB outage can use up a batch's retries).
* The DLQ operations read the `-dlq` by receiving from it (hiding letters `PEEK_S` while
  reading) and make the letters they leave visible again at once.

What SQS cannot do exactly: a standard queue's order is best effort; counts are SQS's
approximations (a delay beyond 15 minutes counts as in flight); the per-reason DLQ counts
come from reading the letters (at most `MAX_DLQ_SCAN`), so a DLQ operation running
elsewhere at that moment hides the letters it holds from them (`dlq` counts them);
`oldest_age_s` is an approximation (SQS tells the oldest age only through CloudWatch).
Dead letters are at-least-once: a crash between the DLQ send and the delete dead-letters
the message again at its next failure (listed and counted twice), one between the send and
the count leaves it uncounted; a crash while retrying leaves two copies with one id.

Exactly-once: the worker commits the batch's DB transaction, then settles. A crash (or an
expired lease) in between redelivers the messages with their ids, and the events' (ts, id)
key drops the repeats.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import orjson
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, NoRegionError

from pipeline import clock, log
from pipeline.bindings.archive_s3 import check_endpoint, translate
from pipeline.bindings.db import Database
from pipeline.bindings.queue import (
    REASON_INVALID,
    DeadReason,
    Message,
    MessageBatch,
    Queue,
    QueueSettings,
    decide,
    encode_body,
    parse_reason,
)
from pipeline.bindings.queue_sql_dlq import SqlDeadLetters
from pipeline.errors import BindingError, ConfigError, TransientError, ValidationError
from pipeline.ids import uuid7_batch

MAX_ENTRIES = 10  # per SendMessageBatch, ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch
MAX_BATCH_BYTES = 256 * 1024  # bodies and attributes of one SendMessageBatch
MAX_WAIT_S = 20  # the longest long poll
MAX_DELAY_S = 900  # the longest DelaySeconds
MAX_VISIBILITY_S = 43_200  # 12 hours from the receive
RETENTION_S = 1_209_600  # 14 days, SQS's longest
PEEK_S = 30  # how long a DLQ read hides the letters it has read
MAX_DLQ_SCAN = 10_000
POLL_INTERVAL_S = 0.1  # between short polls in the last second of a wait
LEASE_MARGIN_S = 1.0  # a page's lease is taken to start this long before its answer came
SEND_ATTEMPTS = 3
ERROR_CHARS = 4096  # the longest `error` attribute kept
NAME = re.compile(r"[A-Za-z0-9_-]{1,76}")  # 80 with "-dlq"
NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
MISSING_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
TRANSIENT_CODES = {"RequestThrottled", "ThrottlingException", "InternalFailure", "KmsThrottled", "OverLimit"}
RECEIVE_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]
COUNT_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesDelayed",
    "ApproximateNumberOfMessagesNotVisible",
]
# Message attribute names (SQS: letters, digits, -, _ and .).
A_ID, A_TYPE, A_AT, A_ENC, A_ATTEMPTS = "id", "content-type", "enqueued-at", "encoding", "attempts"
A_REASON, A_ERROR, A_FAILED = "reason", "error", "failed-at"


@dataclass(slots=True)
class _Letter:
    """A dead letter as read from the `-dlq` (`message.handle` is "" once deleted)."""

    message: Message
    attempts: int
    reason: str
    error: str
    failed_at: float

    def order(self) -> tuple[float, str, int]:
        """Oldest first; a message's parts (`<id>:<index>`) by index."""
        base, _, index = self.message.id.partition(":")
        return self.failed_at, base, int(index) if index.isdigit() else -1


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _missing(queue: str) -> BindingError:
    return BindingError(f"sqs queue {queue!r} does not exist: run `edgepipe init` (it creates it)")


@contextmanager
def _errors(queue: str) -> Iterator[None]:
    """botocore's exceptions as edgepipe's (archive_s3.translate), plus SQS's own codes."""
    with translate("sqs"):
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in MISSING_CODES:
                raise _missing(queue) from exc
            if code in TRANSIENT_CODES:
                raise TransientError(f"sqs {code}: {exc}") from exc
            raise


def _wire(raw: bytes, content_type: str) -> tuple[str, str | None]:
    """An SQS message body for `raw` and its encoding attribute (None: as it is). SQS
    carries text of XML's characters only, and no empty body."""
    if not raw:
        return "-", "empty"
    if content_type != "bytes":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text and not NOT_SQS_TEXT.search(text):
            return text, None
    return base64.b64encode(raw).decode("ascii"), "base64"


def _unwire(body: str, encoding: str | None) -> bytes:
    if encoding == "base64":
        return base64.b64decode(body)
    if encoding == "empty":
        return b""
    return body.encode("utf-8")


def _attrs(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Message attributes: numbers as Number, the rest as String (SQS refuses empty values)."""
    out = {}
    for name, value in values.items():
        if value is None or value == "":
            continue
        kind = "Number" if isinstance(value, int | float) else "String"
        text = repr(value) if isinstance(value, float) else str(value)
        out[name] = {"DataType": kind, "StringValue": NOT_SQS_TEXT.sub("\ufffd", text)}
    return out


def _entry(mid: str, content_type: str, raw: bytes, enqueued_at: float, delay: int = 0, **extra: Any) -> dict:
    body, encoding = _wire(raw, content_type)
    values = {A_ID: mid, A_TYPE: content_type, A_AT: enqueued_at, A_ENC: encoding, **extra}
    entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": _attrs(values)}
    if delay:
        entry["DelaySeconds"] = delay
    return entry


def _size(entry: dict) -> int:
    """An entry's size as SQS counts it: the body and every attribute's name, type and value."""
    attrs = entry["MessageAttributes"]
    return len(entry["MessageBody"].encode("utf-8")) + sum(
        len(name) + len(a["DataType"]) + len(a["StringValue"].encode("utf-8")) for name, a in attrs.items()
    )


def _slices(entries: list[dict]) -> Iterator[list[dict]]:
    return (entries[i : i + MAX_ENTRIES] for i in range(0, len(entries), MAX_ENTRIES))


def _chunks(entries: list[dict]) -> Iterator[list[dict]]:
    """SendMessageBatch requests: ≤ MAX_ENTRIES entries and ≤ MAX_BATCH_BYTES each."""
    chunk: list[dict] = []
    size = 0
    for entry in entries:
        n = _size(entry)
        if chunk and (len(chunk) == MAX_ENTRIES or size + n > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += n
    if chunk:
        yield chunk


class SqsQueue(Queue):
    shares_transaction = False

    def __init__(
        self,
        name: str,
        db: Database,
        settings: QueueSettings | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.name = name
        self.dlq_name = f"{name}-dlq"
        self.db = db
        self.settings = settings or QueueSettings()
        self.totals = SqlDeadLetters(db, name)  # the lasting per-reason counts, in the DB binding
        self.visibility_s = math.ceil(self.settings.visibility_timeout)
        self._urls: dict[str, str] = {}
        self._head: float | None = None  # enqueued_at of the oldest message of the last batch received
        config = BotoConfig(
            connect_timeout=5,
            read_timeout=MAX_WAIT_S + 10,  # longer than the longest long poll
            retries={"total_max_attempts": SEND_ATTEMPTS, "mode": "standard"},
        )
        try:
            self.client = client or boto3.session.Session().client(
                "sqs", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except NoRegionError:
            raise ConfigError("config error: bindings.queue: no AWS region: add ?region=… to the sqs:// URL") from None

    @classmethod
    def from_url(cls, url: str, db: Database, settings: QueueSettings) -> SqsQueue:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"region", "endpoint_url"}
        if unknown:
            raise ConfigError(f"config error: bindings.queue: unknown URL parameter {sorted(unknown)[0]!r}")
        if not NAME.fullmatch(parts.netloc) or parts.path.strip("/"):
            raise ConfigError(
                f"config error: bindings.queue: {url!r}: sqs://QUEUE_NAME names a standard queue "
                "(letters, digits, - and _, at most 76 characters: its -dlq takes 4 more)"
            )
        endpoint = query.get("endpoint_url")
        if endpoint is not None:
            check_endpoint(endpoint, "queue")
        return cls(parts.netloc, db, settings, region=query.get("region"), endpoint_url=endpoint)

    # -- calls ----------------------------------------------------------------------

    def _lookup(self, queue: str) -> str | None:
        """The queue's URL (cached), None when it does not exist."""
        if queue not in self._urls:
            with _errors(queue):
                try:
                    self._urls[queue] = self.client.get_queue_url(QueueName=queue)["QueueUrl"]
                except ClientError as exc:
                    if _code(exc) in MISSING_CODES:
                        return None
                    raise
        return self._urls[queue]

    def _call(self, op: str, queue: str, **kwargs: Any) -> dict[str, Any]:
        if (url := self._lookup(queue)) is None:
            raise _missing(queue)
        with _errors(queue):
            result: dict[str, Any] = getattr(self.client, op)(QueueUrl=url, **kwargs)
        return result

    def _each(self, op: str, queue: str, chunks: Iterable[list[dict]]) -> list[dict]:
        """`op` (a …Batch call) once per chunk; entries that fail for the server's reasons
        (not the sender's) are tried again, SEND_ATTEMPTS times in all. Returns the failures
        left (SQS's `Failed` items)."""
        left: list[dict] = []
        for chunk in chunks:
            pending = dict(enumerate(chunk))
            for attempt in range(SEND_ATTEMPTS):
                clock.sleep(0.1 * attempt)
                answer = self._call(op, queue, Entries=[{"Id": str(i), **e} for i, e in pending.items()])
                failed = {int(f["Id"]): f for f in answer.get("Failed", [])}
                pending = {i: e for i, e in pending.items() if i in failed}
                if not pending or any(f.get("SenderFault") for f in failed.values()):
                    break
            left += [failed[i] for i in pending]
        return left

    def _send(self, queue: str, entries: list[dict]) -> None:
        """SendMessageBatch every entry; raises when some still fail."""
        if failed := self._each("send_message_batch", queue, _chunks(entries)):
            kind = BindingError if any(f.get("SenderFault") for f in failed) else TransientError
            codes = ", ".join(sorted({str(f.get("Code")) for f in failed}))
            raise kind(f"sqs: {len(failed)} of {len(entries)} messages not sent to {queue!r} ({codes})")

    def _delete(self, queue: str, handles: list[str]) -> None:
        entries = [{"ReceiptHandle": h} for h in handles]
        if failed := self._each("delete_message_batch", queue, _slices(entries)):
            # deleted already, or its handle is stale (received again since): SQS delivers it again
            log.event("queue_delete_failed", logging.WARNING, queue=queue, messages=len(failed))

    def _show(self, queue: str, timeouts: list[tuple[str, int]]) -> None:
        """ChangeMessageVisibility(Batch); a message its handle no longer holds (deleted,
        received again since) is left alone."""
        entries = [{"ReceiptHandle": h, "VisibilityTimeout": t} for h, t in timeouts]
        if failed := self._each("change_message_visibility_batch", queue, _slices(entries)):
            log.event("queue_visibility_unchanged", logging.INFO, queue=queue, messages=len(failed))

    def _counts(self, queue: str) -> dict[str, int]:
        """The queue's message counts. (It asks for "All": one request either way, and
        emulators such as moto work out every attribute once per name asked for.)"""
        attrs = self._call("get_queue_attributes", queue, AttributeNames=["All"])["Attributes"]
        return {k: int(attrs.get(k, 0)) for k in COUNT_ATTRIBUTES}

    def ensure(self) -> None:
        for queue in (self.name, self.dlq_name):
            if self._lookup(queue) is None:
                with _errors(queue):
                    attributes = {"MessageRetentionPeriod": str(RETENTION_S)}
                    self._urls[queue] = self.client.create_queue(QueueName=queue, Attributes=attributes)["QueueUrl"]

    def close(self) -> None:
        self.client.close()

    # -- producing and consuming ----------------------------------------------------------

    def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        encoded = [encode_body(body) for body in bodies]  # all, before anything is sent
        ids = uuid7_batch(len(encoded))
        now = clock.now_s()
        self._send(self.name, [_entry(mid, kind, data, now) for mid, (data, kind) in zip(ids, encoded, strict=True)])
        return ids

    def receive(self, max_messages: int, wait_seconds: float = 0.0) -> MessageBatch:
        if max_messages < 1:
            raise ValidationError("max_messages", "must be ≥ 1")
        batch = MessageBatch(self.name)
        deadline = clock.monotonic() + wait_seconds
        while len(batch) < max_messages:
            wait = min(MAX_WAIT_S, max(0, int(deadline - clock.monotonic()))) if wait_seconds > 0 else 0
            asked = clock.monotonic()
            page = self._call(
                "receive_message",
                self.name,
                MaxNumberOfMessages=min(MAX_ENTRIES, max_messages - len(batch)),
                VisibilityTimeout=self.visibility_s,
                WaitTimeSeconds=wait,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=RECEIVE_ATTRIBUTES,
            ).get("Messages", [])
            if page and not batch.lease:
                batch.lease = repr(max(asked, clock.monotonic() - LEASE_MARGIN_S))
            batch.messages += map(self._message, page)
            left = deadline - clock.monotonic()
            if left <= 0 and (wait_seconds > 0 or not page):
                break
            if not page and wait == 0:
                clock.sleep(min(POLL_INTERVAL_S, left))
        if batch.messages:
            self._head = min(m.enqueued_at for m in batch)
        return batch

    @staticmethod
    def _message(m: dict[str, Any]) -> Message:
        attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
        system = m.get("Attributes", {})
        return Message(
            attrs.get(A_ID) or m["MessageId"],
            float(attrs.get(A_AT) or int(system.get("SentTimestamp", 0)) / 1000),
            int(attrs.get(A_ATTEMPTS, 0)) + int(system.get("ApproximateReceiveCount", 1)),
            _unwire(m["Body"], attrs.get(A_ENC)),
            attrs.get(A_TYPE, "json"),
            m["ReceiptHandle"],
        )

    def _leased_for(self, batch: MessageBatch) -> float:
        """Seconds since the batch's lease began (infinite for a batch that holds none)."""
        return clock.monotonic() - float(batch.lease) if batch.lease else math.inf

    def settle(self, batch: MessageBatch, failure: str | None = None) -> None:
        if not batch.messages:
            return
        held = self._leased_for(batch)
        if held >= self.visibility_s:
            log.event("queue_lease_expired", logging.WARNING, queue=self.name, messages=len(batch), held_s=held)
            return
        decided = decide(batch, failure, self.settings)
        parts, retries, dead = decided.parts, decided.retries, decided.dead
        now = clock.now_s()
        letters = [self._letter(m, m.id, m.raw, m.content_type, reason, error, now) for m, reason, error in dead]
        for m in parts:
            items = orjson.loads(m.raw)
            letters += [
                self._letter(m, f"{m.id}:{i}", orjson.dumps(items[i]), "json", part.reason, part.error, now)
                for i, part in m.dead_parts or ()
            ]
        if letters:
            self._send(self.dlq_name, letters)
            self._count(Counter(e["MessageAttributes"][A_REASON]["StringValue"] for e in letters))  # then counted
        soon = [(m, math.ceil(d)) for m, d in retries if d <= MAX_DELAY_S]
        if soon:  # sent again, with their delay and their deliveries so far
            self._send(
                self.name, [_entry(m.id, m.content_type, m.raw, m.enqueued_at, d, attempts=m.attempts) for m, d in soon]
            )
        gone = decided.acks + [m for m, _, _ in dead] + [m for m, _ in soon]
        self._delete(self.name, [m.handle for m in gone])
        budget = MAX_VISIBILITY_S - math.ceil(held) - 1
        later = [(m.handle, min(math.ceil(d), budget)) for m, d in retries if d > MAX_DELAY_S]
        if later:  # longer than DelaySeconds allows: hidden until then, where they are
            self._show(self.name, later)

    @staticmethod
    def _letter(m: Message, mid: str, raw: bytes, kind: str, reason: str, error: str, now: float) -> dict:
        """The `-dlq` entry of a dead message (or of one element of its array body)."""
        extra: dict[str, Any] = {
            A_ATTEMPTS: m.attempts,
            A_REASON: str(reason),
            A_ERROR: error[:ERROR_CHARS],
            A_FAILED: now,
        }
        return _entry(mid, kind, raw, m.enqueued_at, **extra)

    def _count(self, reasons: Counter[str]) -> None:
        """Add dead letters to the lasting counts, as the db queue counts its own."""
        with self.db.transaction() as conn:
            self.totals.count(conn, reasons.elements())

    def _uncount(self, reasons: Counter[str]) -> None:
        with self.db.transaction() as conn:
            self.totals.uncount(conn, reasons.elements())

    def release(self, batch: MessageBatch) -> None:
        if batch.messages and self._leased_for(batch) < self.visibility_s:
            self._show(self.name, [(m.handle, 0) for m in batch])

    # -- operations -----------------------------------------------------------------------

    def depth(self) -> int:
        return sum(self._counts(self.name).values())

    def stats(self) -> dict[str, int]:
        main = self._counts(self.name)
        dlq_counts = self._counts(self.dlq_name)
        dlq = sum(dlq_counts.values())
        out = {
            "pending": main["ApproximateNumberOfMessages"] + main["ApproximateNumberOfMessagesDelayed"],
            "in_flight": main["ApproximateNumberOfMessagesNotVisible"],
        }
        reasons: Counter[str] = Counter()
        if dlq:
            with self._letters(dlq_counts["ApproximateNumberOfMessages"]) as letters:
                reasons.update(letter.reason for letter in letters)
        out["dlq"] = max(dlq, reasons.total())
        out.update({f"dlq_{reason}": n for reason, n in sorted(reasons.items())})
        return out

    def oldest_age_s(self) -> float:
        """The age of the oldest message in the last batch this process received, while the
        queue is not empty (0 when it is, or before this process received anything). While
        consumers keep up this is their lag; when they stop, it keeps growing from there,
        as the true age does. Processes that never receive (`edgepipe serve`) report 0."""
        if not self.depth():
            self._head = None
        return 0.0 if self._head is None else max(0.0, clock.now_s() - self._head)

    @contextmanager
    def _letters(self, expected: int | None = None) -> Iterator[list[_Letter]]:
        """The `-dlq`'s letters (at most MAX_DLQ_SCAN), oldest first, hidden while the block
        runs; those still in the DLQ after it are made visible again."""
        read: dict[str, _Letter] = {}  # by SQS's MessageId: a letter read twice is one
        if expected is None:
            expected = self._counts(self.dlq_name)["ApproximateNumberOfMessages"]
        misses = 0
        for _ in range(MAX_DLQ_SCAN // MAX_ENTRIES):
            page = self._call(
                "receive_message",
                self.dlq_name,
                MaxNumberOfMessages=MAX_ENTRIES,
                VisibilityTimeout=PEEK_S,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            known = len(read)
            read.update((m["MessageId"], self._read_letter(m)) for m in page)  # the latest handle holds
            misses = 0 if len(read) > known else misses + 1  # nothing new: empty, or letters read again
            if misses and (len(read) >= expected or misses == 3):  # a short poll may miss some: try again
                break
        letters = sorted(read.values(), key=_Letter.order)
        try:
            yield letters
        finally:
            self._show(self.dlq_name, [(x.message.handle, 0) for x in letters if x.message.handle])

    @staticmethod
    def _read_letter(m: dict[str, Any]) -> _Letter:
        message = SqsQueue._message(m)
        attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
        failed_at = float(attrs.get(A_FAILED) or message.enqueued_at)
        reason = attrs.get(A_REASON, REASON_INVALID)
        return _Letter(message, int(attrs.get(A_ATTEMPTS, 0)), reason, attrs.get(A_ERROR, ""), failed_at)

    @staticmethod
    def _matching(letters: list[_Letter], code: DeadReason | None, before: float | None) -> list[_Letter]:
        return [
            letter
            for letter in letters
            if (code is None or letter.reason == code.value) and (before is None or letter.failed_at < before)
        ]

    def dlq_list(
        self, limit: int = 100, reason: str | None = None, before: float | None = None
    ) -> list[dict[str, Any]]:
        code = parse_reason(reason)  # a bad filter fails before the DLQ is read
        with self._letters() as letters:
            chosen = self._matching(letters, code, before)[:limit]
        return [
            {
                "message_id": x.message.id,
                "attempts": x.attempts,
                "reason": x.reason,
                "error": x.error,
                "failed_at": clock.iso(x.failed_at),
                "body": x.message.raw.decode("utf-8", errors="replace"),
            }
            for x in chosen
        ]

    def _take(self, chosen: list[_Letter]) -> None:
        """Delete `chosen` from the `-dlq`; they are no longer made visible again."""
        self._delete(self.dlq_name, [x.message.handle for x in chosen])
        for x in chosen:
            x.message.handle = ""

    def dlq_redrive(self, limit: int | None = None, reason: str | None = None, before: float | None = None) -> int:
        code = parse_reason(reason)
        with self._letters() as letters:
            chosen = self._matching(letters, code, before)[:limit]
            if chosen:
                entries = [_entry(m.id, m.content_type, m.raw, m.enqueued_at) for m in (x.message for x in chosen)]
                self._send(self.name, entries)  # a fresh attempt count: no `attempts` attribute
                self._take(chosen)
                self._uncount(Counter(x.reason for x in chosen))
        return len(chosen)

    def dlq_purge(self, reason: str | None = None, before: float | None = None) -> int:
        code = parse_reason(reason)
        with self._letters() as letters:
            chosen = self._matching(letters, code, before)
            if chosen:
                self._take(chosen)
        return len(chosen)

    def rejected_totals(self) -> dict[str, int]:
        return self.totals.totals()
