"""`redis://HOST:PORT/DB?stream=NAME` — the QUEUE binding on Redis Streams.

Keys, all named after the stream NAME:

* `NAME` — the stream. One entry per message, fields `id` (our UUIDv7 message id, kept
  across redeliveries, delayed retries and redrives), `content_type`, `body`,
  `enqueued_at` (epoch seconds by `pipeline.clock`) and `attempts` (deliveries counted
  before this entry was added: 0 when sent or redriven). The consumer group `edgepipe`
  reads it; each `RedisQueue` is one consumer of the group (`host-pid-random`), and
  leaves the group at `close` when it holds nothing.
* `NAME:delayed` — a sorted set of retries waiting for their time: score = due time by
  `pipeline.clock`, member = the message packed with MessagePack.
* `NAME:aged` — a sorted set, message id → enqueued_at, of the messages that are not at
  their place in the stream's order: waiting in `NAME:delayed`, or added again at the end
  of the stream (a due retry, a redriven letter). Messages in their place need no entry:
  the stream's first entry is the oldest of them.
* `NAME:dlq` — the dead letters, a stream in failure order, fields `message_id`,
  `content_type`, `body`, `enqueued_at`, `failed_at`, `attempts`, `reason`, `error`.
* `NAME:dlq:counts` — a hash, reason → letters in `NAME:dlq` now (for `stats`).
* `NAME:dlq:totals` — a hash, reason → letters ever counted (`rejected_totals`).

Two queues on one Redis need names that are not each other's keys (not `events` and
`events:dlq`).

How the contract maps onto Redis. Every step is one Lua script, atomic like a MULTI/EXEC
and one round trip: a send, a receive that finds its batch, a settle, a release, a chunk of
the DLQ.

* `send_batch`: every body is encoded (and refused) before anything is written, then
  scripts XADD them, `SEND_CHUNK` messages each, all in one MULTI/EXEC.
* `receive`: one script moves due retries from `NAME:delayed` to the end of the stream,
  takes messages whose lease expired (XAUTOCLAIM, min-idle-time = `visibility_timeout`),
  then new ones (XREADGROUP `>`). Until the batch is full or `wait_seconds` passed, it
  blocks in XREADGROUP BLOCK for at most `WAIT_SLICE_S` at a time and runs the script
  again. `Message.attempts` = the entry's `attempts` + its delivery count in the pending
  entries list (PEL). The group is created when it is missing (NOGROUP). The script
  answers with two bulk strings (a header line per message, the bodies end to end), which
  the client parses far faster than nested arrays.
* A lease is a PEL entry. The Redis server's clock times it (XAUTOCLAIM measures idle
  time), not `pipeline.clock`: a frozen clock does not expire leases, real time does.
* Ownership: a message's `handle` is its stream entry id and the delivery count it was
  received with. `settle` and `release` act on a message only while the PEL still has it
  under this consumer with that count (XPENDING per entry, inside the script): a
  redelivery, by any consumer, raises the count, so a late settle of a batch whose lease
  expired leaves the new delivery alone.
* `settle`: ack = XACK + XDEL. A retry without delay stays in the PEL, given back with
  XCLAIM IDLE `visibility_timeout` (so the next XAUTOCLAIM takes it, and counts it); a
  delayed retry is XACKed, XDELed and put in `NAME:delayed` with its attempts so far. A
  dead letter is XADDed to `NAME:dlq` and counted in both hashes in the same script.
  Decisions, failures and retries exhausted follow `pipeline.bindings.queue`.
* `release`: XCLAIM to self with IDLE `visibility_timeout` and RETRYCOUNT = count − 1:
  visible to the next XAUTOCLAIM at once, which counts the delivery again, so it is not
  counted twice. A message already settled (acked, or retried: its idle time is past the
  lease) is left alone.
* `stats`: `in_flight` = PEL entries whose lease is running (idle < visibility timeout);
  `pending` = every other message: stream entries outside the PEL, expired leases and
  retries given back, and `NAME:delayed`. `depth` = stream length + delayed.
* `oldest_age_s`: the older of the stream's first entry (stream order is send order) and
  the first of `NAME:aged`: two reads, whatever the depth.
* The DLQ: `dlq_list` reads `NAME:dlq` in order; `dlq_redrive` and `dlq_purge` work
  through it in chunks, each chunk one script that deletes the letters it takes, so two
  concurrent callers never take one letter twice.

Exactly-once: the worker receives, runs the handler in a DB transaction that inserts the
events keyed by (ts, id) — an event without an id takes its message id — and settles
after the commit. A crash between the commit and the ack redelivers the messages with
the same ids, and the database drops the repeats.

Connection settings may be given as URL query parameters, as redis-py reads them. On
Redis Cluster every key must share a hash slot: give the stream a hash tag, e.g.
`stream={events}`. Connection failures, timeouts and a read-only replica raise
`TransientError`; any other Redis error `BindingError`.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, cast

import orjson
import redis
from redis.exceptions import RedisError, ResponseError

from pipeline import clock
from pipeline.bindings.queue import (
    DeadReason,
    Message,
    MessageBatch,
    Queue,
    QueueSettings,
    decide,
    encode_body,
    parse_reason,
)
from pipeline.bindings.redis_client import client_from_url, translate
from pipeline.errors import ConfigError, ValidationError
from pipeline.ids import uuid7_batch

GROUP = "edgepipe"
WAIT_SLICE_S = 0.25  # how long a waiting receive blocks before it looks again for due retries and expired leases
DLQ_CHUNK = 500  # dead letters examined per round trip
SEND_CHUNK = 1000  # messages per script of a send (a send is one MULTI/EXEC of such scripts)
Arg = str | int | bytes  # a script argument

_LUA_HELPERS = """
local function fields(list)
  local t = {}
  for i = 1, #list, 2 do t[list[i]] = list[i + 1] end
  return t
end
local function chunked(head, items)
  for i = 1, #items, 500 do
    local args = {unpack(head)}
    for j = i, math.min(i + 499, #items) do args[#args + 1] = items[j] end
    redis.call(unpack(args))
  end
end
"""

# KEYS stream; ARGV enqueued_at, then message id, content type and body per message.
SEND = """
for i = 2, #ARGV, 3 do
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'content_type', ARGV[i + 1], 'body', ARGV[i + 2],
             'enqueued_at', ARGV[1], 'attempts', 0)
end
"""

# KEYS stream, delayed; ARGV group, consumer, now, count, lease ms. Takes expired leases
# first, then new messages. Returns {header, bodies}: a header line per message, "entry id,
# content type, enqueued_at, attempts, delivery count, body length, message id" separated
# by spaces, and the bodies end to end.
TAKE = (
    _LUA_HELPERS
    + """
local stream, delayed = KEYS[1], KEYS[2]
local group, consumer, now, want, lease = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
for _, packed in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, want)) do
  local m = cmsgpack.unpack(packed)
  redis.call('XADD', stream, '*', 'id', m[1], 'content_type', m[2], 'body', m[3], 'enqueued_at', m[4],
             'attempts', m[5])
  redis.call('ZREM', delayed, packed)
end
local lines, bodies, cursor = {}, {}, '0-0'
local function add(entry, list, count)
  local f = fields(list)
  lines[#lines + 1] = table.concat({entry, f.content_type, f.enqueued_at, f.attempts, count, #f.body, f.id}, ' ')
  bodies[#bodies + 1] = f.body
end
repeat
  local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, lease, cursor, 'COUNT', want - #lines)
  cursor = claimed[1]
  for _, e in ipairs(claimed[2]) do
    if e[2] then add(e[1], e[2], redis.call('XPENDING', stream, group, e[1], e[1], 1)[1][4]) end
  end
until cursor == '0-0' or #lines >= want
if #lines < want then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want - #lines, 'STREAMS', stream, '>')
  if read then
    for _, e in ipairs(read[1][2]) do add(e[1], e[2], 1) end
  end
end
return {table.concat(lines, '\\n'), table.concat(bodies)}
"""
)

# KEYS stream, delayed, aged, dlq, dlq counts, dlq totals; ARGV group, consumer, now, lease
# ms, the decisions as JSON: {"ack": [[entry, count, id, letters?]], "dead": [[entry, count,
# attempts, reason, error]], "retry": [[entry, count, due or "", attempts]]}; a part letter
# is [letter id, body, reason, error, enqueued_at, attempts].
SETTLE = (
    _LUA_HELPERS
    + """
local stream, delayed, aged, dlq, counts, totals = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, consumer, now, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local spec = cjson.decode(ARGV[5])
local function held(entry, count)
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)[1]
  return p ~= nil and p[2] == consumer and p[4] == count
end
local function stored(entry)  -- the entry's fields ({} when it is gone from the stream)
  local e = redis.call('XRANGE', stream, entry, entry)[1]
  return e and fields(e[2]) or {}
end
local function letter(id, content_type, body, enqueued_at, attempts, reason, error)
  redis.call('XADD', dlq, '*', 'message_id', id, 'content_type', content_type, 'body', body,
             'enqueued_at', enqueued_at, 'failed_at', now, 'attempts', attempts, 'reason', reason, 'error', error)
  redis.call('HINCRBY', counts, reason, 1)
  redis.call('HINCRBY', totals, reason, 1)
end
local gone, done = {}, {}
for _, a in ipairs(spec.ack) do
  if held(a[1], a[2]) then
    gone[#gone + 1], done[#done + 1] = a[1], a[3]
    for _, l in ipairs(a[4] or {}) do letter(l[1], 'json', l[2], l[5], l[6], l[3], l[4]) end
  end
end
for _, d in ipairs(spec.dead) do
  if held(d[1], d[2]) then
    local f = stored(d[1])
    if f.id then letter(f.id, f.content_type, f.body, f.enqueued_at, d[3], d[4], d[5]) end
    gone[#gone + 1], done[#done + 1] = d[1], f.id
  end
end
for _, r in ipairs(spec.retry) do
  if held(r[1], r[2]) then
    if r[3] == '' then
      redis.call('XCLAIM', stream, group, consumer, 0, r[1], 'IDLE', lease, 'RETRYCOUNT', r[2], 'JUSTID')
    else
      local f = stored(r[1])
      if f.id then
        redis.call('ZADD', delayed, r[3], cmsgpack.pack({f.id, f.content_type, f.body, f.enqueued_at, tostring(r[4])}))
        redis.call('ZADD', aged, f.enqueued_at, f.id)
      end
      gone[#gone + 1] = r[1]
    end
  end
end
chunked({'XACK', stream, group}, gone)
chunked({'XDEL', stream}, gone)
if #done > 0 and redis.call('ZCARD', aged) > 0 then chunked({'ZREM', aged}, done) end
return #gone
"""
)

# KEYS stream; ARGV group, consumer, lease ms, then entry id and delivery count pairs.
RELEASE = """
local stream, group, consumer, lease = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)[1]
  if p and p[2] == consumer and p[4] == tonumber(ARGV[i + 1]) and p[3] < lease then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'IDLE', lease, 'RETRYCOUNT', p[4] - 1, 'JUSTID')
  end
end
"""

# KEYS stream, delayed, dlq counts; ARGV group, lease ms.
# Returns {stream length, PEL size, expired leases, delayed, dlq counts as a flat hash}.
STATS = """
local stream, group, lease = KEYS[1], ARGV[1], ARGV[2]
local pel, expired = 0, 0
local summary = redis.pcall('XPENDING', stream, group)
if type(summary) == 'table' and not summary.err then
  pel = summary[1]
  if pel > 0 then expired = #redis.call('XPENDING', stream, group, 'IDLE', lease, '-', '+', pel) end
end
return {redis.call('XLEN', stream), pel, expired, redis.call('ZCARD', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""

# KEYS dlq, stream, aged, dlq counts, dlq totals; ARGV mode (redrive | purge), start, chunk,
# limit, reason ("" any), before ("" any). Takes at most `limit` matching letters of the
# next `chunk`; returns {the last entry examined, entries examined, letters taken}.
TAKE_LETTERS = (
    _LUA_HELPERS
    + """
local dlq, stream, aged, counts, totals = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode, limit, reason, before = ARGV[1], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local rows = redis.call('XRANGE', dlq, ARGV[2], '+', 'COUNT', ARGV[3])
local last, taken = '', 0
for _, e in ipairs(rows) do
  if taken >= limit then break end
  last = e[1]
  local f = fields(e[2])
  if (reason == '' or f.reason == reason) and (not before or tonumber(f.failed_at) < before) then
    redis.call('XDEL', dlq, e[1])
    if redis.call('HINCRBY', counts, f.reason, -1) <= 0 then redis.call('HDEL', counts, f.reason) end
    if mode == 'redrive' then
      redis.call('XADD', stream, '*', 'id', f.message_id, 'content_type', f.content_type, 'body', f.body,
                 'enqueued_at', f.enqueued_at, 'attempts', 0)
      redis.call('ZADD', aged, f.enqueued_at, f.message_id)
      if tonumber(redis.call('HGET', totals, f.reason) or 0) > 0 then redis.call('HINCRBY', totals, f.reason, -1) end
    end
    taken = taken + 1
  end
end
return {last, #rows, taken}
"""
)

# KEYS stream; ARGV group, consumer. Drops the consumer from the group when it holds nothing.
FORGET = """
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if type(held) == 'table' and not held.err and #held == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
"""


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


class RedisQueue(Queue):
    shares_transaction = False

    def __init__(self, client: redis.Redis, stream: str, settings: QueueSettings | None = None) -> None:
        if not stream:
            raise ConfigError("config error: bindings.queue: the Redis stream name must not be empty")
        self.client = client
        self.name = stream
        self.settings = settings or QueueSettings()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.keys = {part: f"{stream}:{part}" for part in ("delayed", "aged", "dlq", "dlq:counts", "dlq:totals")}
        self._lease_ms = max(1, math.ceil(self.settings.visibility_timeout * 1000))
        scripts = (SEND, TAKE, SETTLE, RELEASE, STATS, TAKE_LETTERS, FORGET)
        self._send, self._take, self._settle, self._release, self._stats, self._take_letters, self._forget = (
            client.register_script(s) for s in scripts
        )

    @classmethod
    def from_url(cls, url: str, settings: QueueSettings) -> RedisQueue:
        """`redis://[USER:PASSWORD@]HOST:PORT/DB?stream=NAME` plus any redis-py URL option.
        Connects lazily: a Redis that is down fails the first operation, not start-up."""
        client, stream = client_from_url(url, "queue", "stream")
        if not stream:
            client.close()
            raise ConfigError(
                "config error: bindings.queue: a Redis queue URL names its stream: redis://HOST:PORT/DB?stream=NAME"
            )
        return cls(client, stream, settings)

    def ensure(self) -> None:
        with translate("redis queue"):
            try:
                self.client.xgroup_create(self.name, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def close(self) -> None:
        with suppress(RedisError):
            self._forget(keys=[self.name], args=[GROUP, self.consumer])
        self.client.close()
        self.client.connection_pool.disconnect()

    # -- producing ------------------------------------------------------------------

    def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        encoded = [encode_body(body) for body in bodies]
        ids = uuid7_batch(len(encoded))
        at = repr(clock.now_s())
        with translate("redis queue"):
            pipe = self.client.pipeline(transaction=True)  # the chunks are all or nothing too
            for i in range(0, len(encoded), SEND_CHUNK):
                args: list[Arg] = [at]
                for mid, (data, kind) in zip(ids[i : i + SEND_CHUNK], encoded[i : i + SEND_CHUNK], strict=True):
                    args += (mid, kind, data)
                self._send(keys=[self.name], args=args, client=pipe)
            if encoded:
                pipe.execute()
        return ids

    # -- consuming ------------------------------------------------------------------

    def receive(self, max_messages: int, wait_seconds: float = 0.0) -> MessageBatch:
        if max_messages < 1:
            raise ValidationError("max_messages", "must be ≥ 1")
        batch = MessageBatch(self.name, [], self.consumer)
        deadline = clock.monotonic() + wait_seconds
        budget = wait_seconds  # also ends the wait under a frozen monotonic clock
        with translate("redis queue"):
            batch.messages += self._grouped(self._take_now, max_messages)
            while len(batch) < max_messages and (left := min(deadline - clock.monotonic(), budget)) > 0:
                block = min(left, WAIT_SLICE_S)
                arrived = self._grouped(self._block, max_messages - len(batch), block)
                if not arrived:
                    budget -= block  # a whole slice passed; a slice that brought messages made progress
                batch.messages += arrived
                if len(batch) < max_messages:
                    batch.messages += self._grouped(self._take_now, max_messages - len(batch))
        return batch

    def _grouped(self, take: Callable[..., list[Message]], *args: Any) -> list[Message]:
        """`take(*args)`, creating the consumer group first when Redis answers NOGROUP."""
        try:
            return take(*args)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        self.ensure()
        return take(*args)

    def _take_now(self, n: int) -> list[Message]:
        args: list[Arg] = [GROUP, self.consumer, repr(clock.now_s()), n, self._lease_ms]
        header, bodies = self._take(keys=[self.name, self.keys["delayed"]], args=args)
        messages, pos = [], 0
        for line in header.decode().split("\n") if header else ():
            entry, kind, at, base, count, size, mid = line.split(" ", 6)
            body, pos = bodies[pos : pos + int(size)], pos + int(size)
            messages.append(Message(mid, float(at), int(base) + int(count), body, kind, (entry, int(count))))
        return messages

    def _block(self, n: int, seconds: float) -> list[Message]:
        ms = max(1, math.ceil(seconds * 1000))  # never 0: BLOCK 0 waits forever
        read = cast("list[Any]", self.client.xreadgroup(GROUP, self.consumer, {self.name: ">"}, count=n, block=ms))
        rows = read.items() if isinstance(read, dict) else read or []  # RESP3 answers a map
        return [self._message(entry, fields, 1) for _, entries in rows for entry, fields in entries]

    def _message(self, entry: bytes, f: dict[bytes, bytes], count: int) -> Message:
        attempts = int(f[b"attempts"]) + count
        handle = (entry.decode(), count)
        return Message(
            f[b"id"].decode(), float(f[b"enqueued_at"]), attempts, f[b"body"], f[b"content_type"].decode(), handle
        )

    def settle(self, batch: MessageBatch, failure: str | None = None) -> None:
        if not batch.messages:
            return
        now = clock.now_s()
        spec: dict[str, list[list[Any]]] = {"ack": [], "dead": [], "retry": []}
        decided = decide(batch, failure, self.settings)
        for m in decided.acks:
            entry, count = m.handle
            spec["ack"].append([entry, count, m.id, *([self._part_letters(m)] if m.dead_parts else [])])
        for m, reason, error in decided.dead:
            entry, count = m.handle
            spec["dead"].append([entry, count, m.attempts, reason, error])
        for m, delay in decided.retries:
            entry, count = m.handle
            spec["retry"].append([entry, count, repr(now + delay) if delay > 0 else "", m.attempts])
        k = self.keys
        keys = [self.name, k["delayed"], k["aged"], k["dlq"], k["dlq:counts"], k["dlq:totals"]]
        args: list[Arg] = [GROUP, batch.lease or self.consumer, repr(now), self._lease_ms, orjson.dumps(spec)]
        with translate("redis queue"):
            self._settle(keys=keys, args=args)

    def _part_letters(self, m: Message) -> list[list[Any]]:
        """The dead letters `<id>:<index>` of the array elements an acked message sends to the DLQ."""
        items = orjson.loads(m.raw)
        return [
            [f"{m.id}:{index}", orjson.dumps(items[index]).decode(), letter.reason, letter.error,
             repr(m.enqueued_at), m.attempts]
            for index, letter in m.dead_parts or ()
        ]  # fmt: skip

    def release(self, batch: MessageBatch) -> None:
        handles = [part for m in batch for part in m.handle]
        if handles:
            with translate("redis queue"):
                self._release(keys=[self.name], args=[GROUP, batch.lease or self.consumer, self._lease_ms, *handles])

    # -- operations -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with translate("redis queue"):
            length, pel, expired, delayed, flat = self._stats(
                keys=[self.name, self.keys["delayed"], self.keys["dlq:counts"]], args=[GROUP, self._lease_ms]
            )
        letters = sorted((reason.decode(), int(n)) for reason, n in _pairs(flat).items() if int(n) > 0)
        out = {"pending": length - pel + expired + delayed, "in_flight": pel - expired}
        out["dlq"] = sum(n for _, n in letters)
        out.update({f"dlq_{reason}": n for reason, n in letters})
        return out

    def depth(self) -> int:
        with translate("redis queue"):
            pipe = self.client.pipeline(transaction=True)
            pipe.xlen(self.name)
            pipe.zcard(self.keys["delayed"])
            length, delayed = pipe.execute()
        return int(length) + int(delayed)

    def oldest_age_s(self) -> float:
        with translate("redis queue"):
            pipe = self.client.pipeline(transaction=True)
            pipe.xrange(self.name, "-", "+", count=1)
            pipe.zrange(self.keys["aged"], 0, 0, withscores=True)
            first, aged = pipe.execute()
        times = [float(fields[b"enqueued_at"]) for _, fields in first] + [score for _, score in aged]
        return max(0.0, clock.now_s() - min(times)) if times else 0.0

    def dlq_list(
        self, limit: int = 100, reason: str | None = None, before: float | None = None
    ) -> list[dict[str, Any]]:
        code = parse_reason(reason)
        out: list[dict[str, Any]] = []
        start = "-"
        while len(out) < limit:
            with translate("redis queue"):
                rows = cast("list[Any]", self.client.xrange(self.keys["dlq"], start, "+", count=DLQ_CHUNK))
            for _, f in rows:
                failed_at = float(f[b"failed_at"])
                if (code is None or f[b"reason"].decode() == code) and (before is None or failed_at < before):
                    out.append({
                        "message_id": f[b"message_id"].decode(), "attempts": int(f[b"attempts"]),
                        "reason": f[b"reason"].decode(), "error": f[b"error"].decode(),
                        "failed_at": clock.iso(failed_at), "body": f[b"body"].decode("utf-8", errors="replace"),
                    })  # fmt: skip
            if len(rows) < DLQ_CHUNK:
                break
            start = "(" + rows[-1][0].decode()
        return out[:limit]

    def _take_letters_all(self, mode: str, limit: int | None, reason: str | None, before: float | None) -> int:
        """Redrive or purge the oldest letters matching the filters, chunk by chunk."""
        code = parse_reason(reason)
        k = self.keys
        keys = [k["dlq"], self.name, k["aged"], k["dlq:counts"], k["dlq:totals"]]
        taken, start = 0, "-"
        while limit is None or taken < limit:
            left = 2**53 if limit is None else limit - taken
            args: list[Arg] = [mode, start, DLQ_CHUNK, left, code or "", "" if before is None else repr(before)]
            with translate("redis queue"):
                last, examined, n = self._take_letters(keys=keys, args=args)
            taken += int(n)
            if int(examined) < DLQ_CHUNK or not last:
                break
            start = "(" + last.decode()
        return taken

    def dlq_redrive(self, limit: int | None = None, reason: str | None = None, before: float | None = None) -> int:
        return self._take_letters_all("redrive", limit, reason, before)

    def dlq_purge(self, reason: str | None = None, before: float | None = None) -> int:
        return self._take_letters_all("purge", None, reason, before)

    def rejected_totals(self) -> dict[str, int]:
        with translate("redis queue"):
            stored = cast("dict[bytes, bytes]", self.client.hgetall(self.keys["dlq:totals"]))
        out = {r.value: 0 for r in DeadReason}
        out.update({reason.decode(): int(n) for reason, n in stored.items()})
        return out
