"""The KV binding's contract, written once and run over every KV backend: the `db` KV on
SQLite and on PostgreSQL, and Redis. Then what only the Redis backend has to show (native
expiry under a frozen clock, its index) and a snapshot published through it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from freezegun import freeze_time

import snapshots
from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.bindings.kv import MAX_VALUE_BYTES
from pipeline.bindings.kv_redis import RedisKV
from pipeline.cli.compose import refresh_snapshot
from pipeline.env import Env
from pipeline.errors import ConfigError, TransientError, ValidationError
from pipeline.sample import events
from pipeline.worker import Worker
from tests.conftest import MakeEnv, run_cli
from tests.support import scratch_db

T0 = "2026-11-20T12:00:00Z"
KV_BACKENDS = ["db-sqlite", pytest.param("db-postgres", marks=pytest.mark.postgres), "redis"]


def _delete_namespace(server: str, prefix: str) -> None:
    client = redis.Redis.from_url(server)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_kv_url(redis_server_url: str) -> Iterator[str]:
    """A KV URL on the real Redis with a namespace of its own, deleted afterwards."""
    prefix = f"edgepipe-test-{secrets.token_hex(4)}:kv:"
    yield f"{redis_server_url}?prefix={prefix}"
    _delete_namespace(redis_server_url, prefix)


@pytest.fixture(params=KV_BACKENDS)
def kv_env(request: pytest.FixtureRequest, tmp_path: Path, make_env: MakeEnv) -> Iterator[Env]:
    """A migrated Env on SQLite whose KV binding is each KV backend in turn: the `db` KV on
    SQLite, the `db` KV on a throwaway PostgreSQL schema, a Redis namespace."""
    sqlite = f"sqlite:///{tmp_path / 'edgepipe.db'}"
    if request.param == "db-sqlite":
        yield make_env(sqlite)
    elif request.param == "db-postgres":
        with scratch_db(request.getfixturevalue("pg_server_url"), tmp_path) as url:
            env = make_env(url)
            try:
                yield env
            finally:
                env.close()  # before the schema is dropped (closing again later is harmless)
    else:
        yield make_env(sqlite, bindings={"kv": request.getfixturevalue("redis_kv_url")})


@pytest.fixture
def kv(kv_env: Env) -> Any:
    assert kv_env.KV is not None
    return kv_env.KV


def test_each_backend_is_the_one_configured(kv_env: Env) -> None:
    kind = type(kv_env.KV).__name__
    assert kind == ("RedisKV" if kv_env.config.bindings.kv.startswith("redis://") else "SqlKV")


def test_put_get_types_and_metadata(kv: Any) -> None:
    kv.put("a", "héllo", metadata={"v": 1})
    assert kv.get("a") == "héllo"
    assert kv.get("a", type="bytes") == "héllo".encode()
    assert kv.get_with_metadata("a") == {"value": "héllo", "metadata": {"v": 1}}
    kv.put("j", {"x": [1, 2]})
    assert kv.get("j", type="json") == {"x": [1, 2]}
    kv.put("b", b"\x00\xff")
    assert kv.get("b", type="bytes") == b"\x00\xff"
    assert kv.get("missing") is None
    assert kv.get_with_metadata("missing") == {"value": None, "metadata": None}


def test_put_replaces_value_and_metadata(kv: Any) -> None:
    kv.put("k", "one", metadata={"n": 1})
    kv.put("k", "two")
    assert kv.get_with_metadata("k") == {"value": "two", "metadata": None}
    kv.delete("k")
    assert kv.get("k") is None
    kv.delete("k")  # deleting a missing key is not an error


def test_list_byte_order_prefix_and_cursor(kv: Any) -> None:
    names = ["b", "a", "B", "a/1", "a/2", "é", "z", "a\u00ff", "a/10", "ab"]
    for n in names:
        kv.put(n, n, metadata={"n": n})
    everything = kv.list()
    assert [k["name"] for k in everything["keys"]] == sorted(names, key=lambda s: s.encode())
    assert everything["list_complete"] is True and everything["cursor"] == ""
    assert everything["keys"][0]["metadata"] == {"n": "B"}

    prefixed = kv.list(prefix="a/")
    assert [k["name"] for k in prefixed["keys"]] == ["a/1", "a/10", "a/2"]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = kv.list(limit=3, cursor=cursor)
        pages += 1
        seen += [k["name"] for k in page["keys"]]
        if page["list_complete"]:
            break
        assert page["cursor"]
        cursor = page["cursor"]
    assert seen == sorted(names, key=lambda s: s.encode())
    assert pages == 4


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda kv: kv.put("x" * 513, "v"), "key"),
        (lambda kv: kv.put("é" * 257, "v"), "key"),  # 514 bytes
        (lambda kv: kv.put("", "v"), "key"),
        (lambda kv: kv.put(".", "v"), "key"),
        (lambda kv: kv.put("k", b"x" * (MAX_VALUE_BYTES + 1)), "value"),
        (lambda kv: kv.put("k", "v", metadata={"m": "x" * 1020}), "metadata"),
        (lambda kv: kv.put("k", "v", expiration_ttl=59), "expiration_ttl"),
        (lambda kv: kv.put("k", "v", expiration=1.0), "expiration"),
        (lambda kv: kv.put("k", "v", expiration=2e9, expiration_ttl=100), "expiration"),
        (lambda kv: kv.put("k", object()), "value"),
        (lambda kv: kv.list(limit=0), "limit"),
        (lambda kv: kv.list(limit=1001), "limit"),
        (lambda kv: kv.list(cursor="!!!not base64"), "cursor"),
        (lambda kv: kv.get("k", type="stream"), "type"),
    ],
)
def test_limits_raise_clear_errors_and_change_nothing(kv: Any, call: Any, field: str) -> None:
    kv.put("k", "original", metadata={"keep": True})
    with pytest.raises(ValidationError) as info:
        call(kv)
    assert info.value.field == field
    assert kv.get_with_metadata("k") == {"value": "original", "metadata": {"keep": True}}
    assert [k["name"] for k in kv.list()["keys"]] == ["k"]


def test_limits_at_the_boundary_are_accepted(kv: Any) -> None:
    kv.put("x" * 512, "v", expiration_ttl=60, metadata={"m": "x" * 1010})
    assert kv.get("x" * 512) == "v"


def test_expiry_with_frozen_time(kv: Any) -> None:
    with freeze_time(T0) as frozen:
        kv.put("ttl", "soon", expiration_ttl=60)
        kv.put("abs", "later", expiration=frozen().timestamp() + 3600)
        kv.put("forever", "always")
        listed = {k["name"]: k for k in kv.list()["keys"]}
        assert listed["ttl"]["expiration"] == int(frozen().timestamp()) + 60
        assert "expiration" not in listed["forever"]

        frozen.tick(59)
        assert kv.get("ttl") == "soon"
        frozen.tick(1)
        assert kv.get("ttl") is None
        assert kv.get_with_metadata("ttl") == {"value": None, "metadata": None}
        assert [k["name"] for k in kv.list()["keys"]] == ["abs", "forever"]

        frozen.tick(3600)
        assert kv.get("abs") is None
        assert [k["name"] for k in kv.list()["keys"]] == ["forever"]
        assert kv.purge_expired() == 2
        kv.put("ttl", "again")  # an expired key can be written afresh
        assert kv.get("ttl") == "again"


def test_list_skips_expired_keys_without_losing_the_page_size(kv: Any) -> None:
    with freeze_time(T0) as frozen:
        for i in range(6):
            kv.put(f"k{i}", "v", expiration_ttl=60 if i % 2 else None)
        frozen.tick(61)
        page = kv.list(limit=2)
        assert [k["name"] for k in page["keys"]] == ["k0", "k2"]
        rest = kv.list(limit=2, cursor=page["cursor"])
        assert [k["name"] for k in rest["keys"]] == ["k4"] and rest["list_complete"]


# -- the Redis backend ---------------------------------------------------------------


@pytest.fixture
def redis_kv(redis_kv_url: str) -> Iterator[RedisKV]:
    kv = RedisKV.from_url(redis_kv_url)
    yield kv
    kv.close()


def test_redis_url_prefix_and_options() -> None:
    default = RedisKV.from_url("redis://127.0.0.1:6379/2")
    assert default.prefix == "edgepipe:kv:"
    custom = RedisKV.from_url("redis://127.0.0.1:6379/3?prefix=tenant%3Aa:&socket_timeout=7")
    assert custom.prefix == "tenant:a:"
    options = custom.client.connection_pool.connection_kwargs
    assert options["db"] == 3 and options["socket_timeout"] == 7.0 and "prefix" not in options
    with pytest.raises(ConfigError, match="prefix") as info:
        RedisKV.from_url("redis://:hunter2@127.0.0.1:6379/0?prefix=")
    assert "hunter2" not in str(info.value)
    for bad in ("redis://127.0.0.1:6379/not-a-db", "redis://127.0.0.1:port/0", "redis://h:1/0?socket_timeout=x"):
        with pytest.raises(ConfigError, match=r"bindings\.kv"):
            RedisKV.from_url(bad)
    for kv in (default, custom):
        kv.close()


def test_redis_native_expiry_is_the_remaining_lifetime_on_a_frozen_clock(redis_kv: RedisKV) -> None:
    """A clock frozen long ago: an absolute PEXPIREAT would already be past on the Redis
    server's clock and delete the entry at once. The native TTL is the lifetime left on
    the injected clock; what `get` shows follows that clock alone."""
    client = redis_kv.client
    entry = redis_kv.prefix.encode() + b"e:"
    with freeze_time("2001-01-01T00:00:00Z") as frozen:
        redis_kv.put("ttl", "soon", expiration_ttl=60)
        redis_kv.put("abs", "later", expiration=frozen().timestamp() + 3600)
        redis_kv.put("forever", "always")
        assert 59_000 < client.pttl(entry + b"ttl") <= 60_000
        assert 3_599_000 < client.pttl(entry + b"abs") <= 3_600_000
        assert client.pttl(entry + b"forever") == -1  # no native expiry
        assert redis_kv.get("ttl") == "soon"

        frozen.tick(60)  # expired by the clock while Redis still holds it
        assert client.exists(entry + b"ttl") == 1
        assert redis_kv.get("ttl") is None
        redis_kv.put("abs", "kept")  # a put without expiry clears the native TTL too
        assert client.pttl(entry + b"abs") == -1
        assert redis_kv.purge_expired() == 1
        assert client.exists(entry + b"ttl") == 0
        assert client.zrange(redis_kv.index, 0, -1) == [b"abs", b"forever"]


def test_redis_list_drops_index_members_of_entries_redis_expired(redis_kv: RedisKV) -> None:
    client = redis_kv.client
    entry = redis_kv.prefix.encode() + b"e:"
    for name in ("a", "b", "c", "d"):
        redis_kv.put(name, name, expiration_ttl=600)
    for name in (b"b", b"c"):
        assert client.pexpireat(entry + name, 1)  # a time long past: Redis expires it now
    page = redis_kv.list(limit=2)
    assert [k["name"] for k in page["keys"]] == ["a", "d"] and page["list_complete"]
    assert client.zrange(redis_kv.index, 0, -1) == [b"a", b"d"]
    assert redis_kv.get("b") is None

    redis_kv.put("e", "e")
    assert client.pexpireat(entry + b"e", 1)
    assert redis_kv.purge_expired() == 1  # its index member, left behind by Redis
    assert client.zrange(redis_kv.index, 0, -1) == [b"a", b"d"]


def test_redis_drop_rechecks_each_entry_on_the_server(redis_kv: RedisKV) -> None:
    """The names a scan found expired are dropped only if they still are: a key written
    again in between keeps its entry and its place in the index."""
    with freeze_time(T0) as frozen:
        redis_kv.put("k", "old", expiration_ttl=60)
        frozen.tick(61)
        redis_kv.put("k", "new")  # written again after a scan saw "old" expired
        assert redis_kv._drop_names([b"k"], clock.now_s()) == 0
        assert redis_kv._drop_names([b"k"], None) == 0
        assert redis_kv.get("k") == "new" and [k["name"] for k in redis_kv.list()["keys"]] == ["k"]


def test_redis_unreachable_is_a_transient_error() -> None:
    kv = RedisKV.from_url("redis://127.0.0.1:1/0?socket_connect_timeout=1")  # nothing listens on port 1
    try:
        with pytest.raises(TransientError, match="redis kv"):
            kv.get("k")
    finally:
        kv.close()


def test_snapshots_publish_through_redis_kv_unchanged(sqlite_url: str, redis_kv_url: str, make_env: MakeEnv) -> None:
    """A snapshot refreshed with the KV binding on Redis reads back exactly as built, from
    the library, the raw stored bytes and the CLI; its versions list and prune as on the
    embedded KV."""
    env = make_env(sqlite_url, bindings={"kv": redis_kv_url}, snapshots={"top_n": 20})
    assert isinstance(env.KV, RedisKV)
    with freeze_time("2026-11-20T12:30:00Z"):
        now_s = clock.now_s()
        env.QUEUE.send_batch(list(events(2000, days=1.5, n_paths=60, end_ms=int(now_s * 1000), seed=7)))
        Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)
        expected = snapshots.build(env.DB, 24, 20, now_s)
        assert len(expected["paths"]) == 20
        assert refresh_snapshot(env)["version"] == 1
        assert refresh_snapshot(env)["latest"] is True

    latest = snapshots.read_latest(env.KV)
    assert latest == {"version": 2, **expected}
    assert env.KV.get(snapshots.version_key(1), type="json") == {"version": 1, **expected}
    raw = env.KV.client.hget(env.KV.prefix.encode() + b"e:" + snapshots.LATEST_KEY.encode(), b"v")
    assert raw == orjson.dumps({"version": 2, **expected})  # the bytes publish wrote, as they were
    info = {"generated_at": "2026-11-20T12:30:00Z", "paths": 20}
    assert snapshots.list_versions(env.KV) == [{"key": snapshots.version_key(n), **info, "version": n} for n in (1, 2)]

    kv_url = {"EDGEPIPE_BINDINGS__KV": redis_kv_url}
    assert run_cli(env, "snapshot", "refresh", environ=kv_url).exit_code == 0
    shown = orjson.loads(run_cli(env, "snapshot", "show", "--json", environ=kv_url).stdout)
    assert shown == snapshots.read_latest(env.KV) and shown["version"] == 3
    assert snapshots.prune(env.KV, 1)["deleted_versions"] == [1, 2]
    assert [v["version"] for v in snapshots.list_versions(env.KV)] == [3]
    assert snapshots.read_latest(env.KV)["version"] == 3
