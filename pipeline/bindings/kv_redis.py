"""`redis://HOST:PORT/DB?prefix=edgepipe:kv:` — the KV binding on Redis.

Key layout, everything under the namespace's prefix P (default `edgepipe:kv:`):

* `P e:<key>` — one hash per entry, the key's UTF-8 bytes appended as they are (Redis keys
  are binary-safe). Fields: `v` the value bytes; `m` the metadata JSON, absent when there
  is none; `x` the absolute expiration in epoch seconds, `""` when the entry never expires.
  `x` is always written, so a hash without it is an entry that is gone.
* `P i` — the index: a sorted set of every key name, all with score 0.

How the contract maps onto Redis:

* Atomic put. `put` is one MULTI/EXEC: DEL the hash, HSET its fields, PEXPIRE it, ZADD the
  name to the index. A reader (HMGET of one hash) sees the old value and metadata or the
  new ones, never a mix, and `list` never sees a key whose entry was not written with it.
  `delete` is one MULTI: DEL the hash, ZREM the name.
* Expiry. The stored `x` comes from `pipeline.clock` (`clock.now_s()` + TTL, or the given
  absolute time), and `get` and `list` compare it with `clock.now_s()`: that comparison
  decides what is visible, so a frozen or simulated clock sees the Workers KV semantics
  exactly. Redis's native expiry only reclaims memory: the hash gets PEXPIRE of the
  *remaining* lifetime measured on that same clock (always ≥ 60 s), not PEXPIREAT of the
  absolute time. Under a clock frozen in the past an absolute expiry would already have
  passed on the Redis server's own clock, which would delete the entry the moment it is
  written; a relative one is also immune to skew between this host's clock and Redis's.
* List in byte order with a cursor. Redis orders members of equal score by memcmp of their
  bytes, so `ZRANGEBYLEX` over the index walks key names in UTF-8 byte order: a prefix is
  the range `[prefix` … `(prefix_end(prefix)`, the cursor (the last name returned, encoded
  by the base class) resumes it as `(name`. Metadata and expiration come from one
  pipelined HMGET per page. Expired entries are skipped and more names are read, so a page
  still holds `limit` keys when there are that many.
* Stale index members. When Redis has expired a hash natively its name stays in the
  index until someone notices: `list` drops the names whose hash it found gone, and
  `purge_expired` deletes every entry expired by the clock together with its name. Both go
  through one Lua script that re-checks each entry on the server, so a key written again
  in between is never dropped.
* Limits, encodings and argument checks are the base class's (`pipeline.bindings.kv`);
  values up to 25 MiB fit well under Redis's 512 MB bulk limit.

Connection settings (`socket_timeout`, `socket_connect_timeout`, `health_check_interval`, …)
may be given as URL query parameters, as redis-py reads them; the password comes from
the URL in the environment (`EDGEPIPE_BINDINGS__KV`), never from a config file, and is
left out of error messages. The client is redis-py's standalone one: a single Redis, or a
primary behind one address (Redis Cluster is not supported). Run Redis without eviction
(`maxmemory-policy noeviction`): an evicted index member would hide a live key from `list`.

Connection failures, timeouts and a replica that is read-only during a failover raise
`TransientError`; any other Redis error `BindingError`.
"""

from __future__ import annotations

import math
from typing import cast

import redis

from pipeline import clock
from pipeline.bindings.kv import KV, Entry, prefix_end
from pipeline.bindings.redis_client import client_from_url, translate
from pipeline.errors import ConfigError

DEFAULT_PREFIX = "edgepipe:kv:"
SCAN_CHUNK = 64  # fewest index members read per round trip while listing
PURGE_CHUNK = 500  # index members examined per round trip by purge_expired
MAX_NATIVE_TTL_MS = 2**53  # PEXPIRE of a far-off expiration, kept inside Redis's range

# KEYS[1] the index, KEYS[2..] entry hashes; ARGV[1] the clock's now ("" drops only entries
# already gone), ARGV[2..] the index members of those hashes. An entry is dropped when its
# hash is gone, or, given a now, when its expiration has passed; its index member goes with
# it. Returns how many names left the index.
DROP_EXPIRED = """
local now = tonumber(ARGV[1])
local dropped = 0
for i = 2, #KEYS do
  local x = redis.call('HGET', KEYS[i], 'x')
  local gone = not x
  if x and now and x ~= '' then
    local at = tonumber(x)
    if at and at <= now then
      redis.call('DEL', KEYS[i])
      gone = true
    end
  end
  if gone then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
"""


def _expiration(raw: bytes | None) -> float | None:
    return float(raw) if raw else None


class RedisKV(KV):
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix:
            raise ConfigError("config error: bindings.kv: the Redis key prefix must not be empty")
        self.client = client
        self.prefix = prefix
        self._entry_prefix = prefix.encode() + b"e:"
        self.index = prefix.encode() + b"i"
        self._drop = client.register_script(DROP_EXPIRED)

    @classmethod
    def from_url(cls, url: str) -> RedisKV:
        """`redis://[USER:PASSWORD@]HOST:PORT/DB?prefix=…` plus any redis-py URL option.
        Connects lazily: a Redis that is down fails the first operation, not start-up."""
        client, prefix = client_from_url(url, "kv", "prefix")
        if prefix == "":
            client.close()
            raise ConfigError("config error: bindings.kv: prefix= must not be empty")
        return cls(client, DEFAULT_PREFIX if prefix is None else prefix)

    def _key(self, key: bytes) -> bytes:
        return self._entry_prefix + key

    # -- the primitives of the base class ---------------------------------------------

    def _read(self, key: bytes) -> Entry | None:
        with translate("redis kv"):
            found = cast("list[bytes | None]", self.client.hmget(self._key(key), [b"v", b"m", b"x"]))
        value, metadata, expiration = found
        if value is None:
            return None
        expires = _expiration(expiration)
        if expires is not None and expires <= clock.now_s():
            return None
        return Entry(value, None if metadata is None else metadata.decode(), expires)

    def _write(self, key: bytes, value: bytes, metadata: str | None, expiration: float | None) -> None:
        entry = self._key(key)
        fields = {b"v": value, b"x": b"" if expiration is None else repr(expiration).encode()}
        if metadata is not None:
            fields[b"m"] = metadata.encode()
        with translate("redis kv"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(entry)
            pipe.hset(entry, mapping=fields)  # type: ignore[arg-type]  # bytes keys and values
            if expiration is not None:
                remaining_ms = min((expiration - clock.now_s()) * 1000, MAX_NATIVE_TTL_MS)
                pipe.pexpire(entry, max(1, math.ceil(remaining_ms)))
            pipe.zadd(self.index, {key: 0})
            pipe.execute()

    def _delete(self, key: bytes) -> None:
        with translate("redis kv"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._key(key))
            pipe.zrem(self.index, key)
            pipe.execute()

    def _scan(self, prefix: bytes, after: bytes | None, limit: int) -> list[tuple[bytes, Entry]]:
        end = prefix_end(prefix)
        upper = b"+" if end is None else b"(" + end
        if after is not None and after >= prefix:
            lower = b"(" + after
        elif prefix:
            lower = b"[" + prefix
        else:
            lower = b"-"
        now = clock.now_s()
        out: list[tuple[bytes, Entry]] = []
        while len(out) < limit:
            chunk = max(limit - len(out), SCAN_CHUNK)
            with translate("redis kv"):
                names = cast("list[bytes]", self.client.zrangebylex(self.index, lower, upper, start=0, num=chunk))
                if not names:
                    break
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hmget(self._key(name), [b"m", b"x"])
                fields = pipe.execute()
            gone = []
            for name, (metadata, expiration) in zip(names, fields, strict=True):
                if expiration is None:
                    gone.append(name)  # expired natively by Redis: only the index member is left
                    continue
                expires = _expiration(expiration)
                if expires is not None and expires <= now:
                    continue
                out.append((name, Entry(b"", None if metadata is None else metadata.decode(), expires)))
            if gone:
                self._drop_names(gone, None)
            if len(names) < chunk:
                break
            lower = b"(" + names[-1]
        return out[:limit]

    def _drop_names(self, names: list[bytes], now: float | None) -> int:
        """Drop the entries of `names` that are gone (and, given `now`, those expired by
        then) with their index members, re-checked atomically on the server."""
        with translate("redis kv"):
            dropped = self._drop(
                keys=[self.index, *(self._key(n) for n in names)],
                args=["" if now is None else repr(now), *names],
            )
        return int(dropped)

    def purge_expired(self) -> int:
        """Delete every entry expired by `clock.now_s()` and every index member whose entry
        Redis already expired; returns how many keys left the namespace."""
        now = clock.now_s()
        lower = b"-"
        purged = 0
        while True:
            with translate("redis kv"):
                names = cast("list[bytes]", self.client.zrangebylex(self.index, lower, b"+", start=0, num=PURGE_CHUNK))
                if not names:
                    break
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hget(self._key(name), b"x")
                stored = pipe.execute()
            doomed = [
                name
                for name, expiration in zip(names, stored, strict=True)
                if expiration is None or (expiration and float(expiration) <= now)
            ]
            if doomed:
                purged += self._drop_names(doomed, now)
            if len(names) < PURGE_CHUNK:
                break
            lower = b"(" + names[-1]
        return purged

    def close(self) -> None:
        self.client.close()
