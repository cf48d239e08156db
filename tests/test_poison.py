"""Poison messages go to the DLQ with a reason naming the field, without retries, and never
hold back the valid messages of their batch; odd but valid input is stored verbatim. Also
the archive watermark (`too_late`) and the distinct-path cap (`__other__`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from consumers.traffic import TrafficConsumer
from pipeline import meta
from pipeline.env import Env
from pipeline.schema import OTHER_PATH, path_stats_hourly, queue_messages, traffic_events
from pipeline.worker import Worker
from tests.conftest import MakeEnv
from tests.faults import NOW, NOW_MS, FaultyHandler
from tests.traffic_truth import assert_aggregates_equal, expected_aggregates, make_events

HOUR_MS = 3_600_000


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as f:
        yield f


@pytest.fixture
def big_env(db_url: str, make_env: MakeEnv) -> Env:
    return make_env(db_url, consumer={"max_batch_size": 1000})


def base(**over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "poison",
        "ts": NOW_MS - 1000,
        "method": "GET",
        "path": "/x",
        "status": 200,
        "response_time_ms": 5,
    }
    event.update(over)
    return {k: v for k, v in event.items() if v is not ...}


POISON: list[tuple[str, Any, str]] = [
    ("not an object", True, "event"),  # (an array is a message of several events)
    ("a number", 42, "event"),
    ("text, not JSON", '{"id": "x", "ts": 1, "path": "/a"', "event"),
    ("NaN as text", '{"id": "x", "response_time_ms": NaN}', "event"),
    ("missing ts", base(ts=...), "ts"),
    ("missing method", base(method=...), "method"),
    ("missing path", base(path=...), "path"),
    ("missing status", base(status=...), "status"),
    ("missing response_time_ms", base(response_time_ms=...), "response_time_ms"),
    ("status as string", base(status="200"), "status"),
    ("status 999", base(status=999), "status"),
    ("status 99", base(status=99), "status"),
    ("ts as list", base(ts=[NOW_MS]), "ts"),
    ("ts not RFC 3339", base(ts="last tuesday"), "ts"),
    ("ts in the future", base(ts=NOW_MS + 6 * 60_000), "ts"),
    ("ts in seconds", base(ts=NOW_MS // 1000), "ts"),
    ("method as number", base(method=5), "method"),
    ("method with spaces", base(method="GET /"), "method"),
    ("method as list", base(method=["GET"]), "method"),
    ("path as number", base(path=5), "path"),
    ("relative path", base(path="x/y"), "path"),
    ("10 KB path", base(path="/" + "x" * 10_240), "path"),
    ("negative response time", base(response_time_ms=-0.5), "response_time_ms"),
    ("NaN response time", base(response_time_ms=float("nan")), "response_time_ms"),  # JSON null
    ("infinite response time", base(response_time_ms=float("inf")), "response_time_ms"),
    ("response time as string", base(response_time_ms="5"), "response_time_ms"),
    ("bytes negative", base(bytes=-1), "bytes"),
    ("bytes as string", base(bytes="10"), "bytes"),
    ("id too long", base(id="i" * 129), "id"),
    ("id as number", base(id=7), "id"),
    ("host too long", base(host="h" * 256), "host"),
    ("colo as object", base(colo={"a": 1}), "colo"),
]


def dlq_by_id(env: Env) -> dict[str, dict[str, Any]]:
    return {d["message_id"]: d for d in env.QUEUE.dlq_list(limit=10_000)}


def drain(env: Env, handler: Any = None) -> None:
    worker = Worker(env, handler or TrafficConsumer(env.config).handle_batch)
    while worker.step(wait=0) is not None:
        pass
    worker.ctx.close()  # wait for background work (snapshot refreshes) to finish


def test_poison_goes_to_dlq_and_valid_siblings_commit(big_env: Env) -> None:
    env = big_env
    pairs = make_events(seed=11, n=60, now_ms=NOW_MS, span_ms=6 * HOUR_MS)
    bodies: list[Any] = []
    expected_field: dict[int, str] = {}
    for i, (body, _) in enumerate(pairs):  # interleave: poison between valid events
        bodies.append(body)
        if i < len(POISON):
            expected_field[len(bodies)] = POISON[i][2]
            bodies.append(POISON[i][1])
    ids = env.QUEUE.send_batch(bodies)

    result = Worker(env, TrafficConsumer(env.config).handle_batch).step(wait=0)
    assert result is not None and result.ok, result
    assert result.messages == len(bodies)  # one batch: poison and valid together

    stats = env.QUEUE.stats()
    assert (stats["pending"], stats["in_flight"], stats["dlq"]) == (0, 0, len(POISON))
    dead = dlq_by_id(env)
    for position, field in expected_field.items():
        entry = dead[ids[position]]
        label = POISON[list(expected_field).index(position)][0]
        assert entry["reason"] == "invalid", label
        assert entry["error"].startswith(f"{field}: "), (label, entry["error"])
        assert entry["attempts"] == 1, label  # no retries for poison
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))


@pytest.mark.parametrize(("label", "body", "field"), POISON, ids=[p[0] for p in POISON])
def test_each_poison_alone(sqlite_url: str, make_env: MakeEnv, label: str, body: Any, field: str) -> None:
    """One poison between two valid events (SQLite; the mixed batch above runs on both)."""
    env = make_env(sqlite_url)
    env.QUEUE.send_batch([base(id="good-1"), body, base(id="good-2", path="/y")])
    drain(env)
    (entry,) = env.QUEUE.dlq_list()
    assert entry["reason"] == "invalid"
    assert entry["error"].split(":", 1)[0] == field
    with env.DB.read() as conn:
        assert sorted(conn.execute(sa.select(traffic_events.c.id)).scalars()) == ["good-1", "good-2"]


def test_malformed_json_body(env: Env) -> None:
    """A stored JSON body that does not parse (a foreign or corrupt producer) is poison too:
    the consumer dead-letters it, and its siblings commit."""
    env.QUEUE.send(base(id="before"))
    with env.DB.transaction() as conn:
        for i, raw in enumerate((b'{"id": "x", "ts": ', b'{"response_time_ms": NaN}', b"\xff\xfe")):
            conn.execute(
                queue_messages.insert().values(
                    queue="events", message_id=f"raw-{i}", content_type="json", body=raw,
                    enqueued_at=NOW_MS / 1000, visible_at=NOW_MS / 1000, attempts=0,
                )
            )  # fmt: skip
    env.QUEUE.send(base(id="after"))
    drain(env)
    dead = dlq_by_id(env)
    assert set(dead) == {"raw-0", "raw-1", "raw-2"}
    for entry in dead.values():
        assert entry["reason"] == "invalid"
        assert entry["error"].startswith("body: malformed JSON")
    with env.DB.read() as conn:
        assert sorted(conn.execute(sa.select(traffic_events.c.id)).scalars()) == ["after", "before"]


SQLISH = [
    ("/users'; DROP TABLE traffic_events; --", "1' OR '1'='1", 'evil.example"; delete from path_stats_hourly; --'),
    ("/q/%27%20OR%201=1", "x); DELETE FROM queue_messages; --", "a.example"),
    ("/\\x00/`rm -rf`/$(id)", "Robert'); DROP TABLE Students;--", "b.example"),
]


def test_sql_looking_strings_are_stored_verbatim(env: Env) -> None:
    bodies = [base(id=i, path=p, host=h, ts=NOW_MS - k) for k, (p, i, h) in enumerate(SQLISH)]
    env.QUEUE.send_batch(bodies)
    drain(env)
    assert env.QUEUE.stats()["dlq"] == 0
    with env.DB.read() as conn:
        rows = conn.execute(sa.select(traffic_events.c.id, traffic_events.c.path, traffic_events.c.host)).all()
        hourly = conn.execute(sa.select(path_stats_hourly.c.path, path_stats_hourly.c.requests)).all()
    assert sorted(rows) == sorted((i, p, h.lower()) for p, i, h in SQLISH)
    assert sorted(hourly) == sorted((p, 1) for p, _, _ in SQLISH)
    # every table is still there and still works
    env.QUEUE.send(base(id="later"))
    drain(env)
    with env.DB.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(traffic_events)).scalar_one() == 4


def test_event_without_id_uses_the_message_id_across_redeliveries(env: Env) -> None:
    mid = env.QUEUE.send(base(id=...))
    drain(env, FaultyHandler(env.config, fail={0, 1}, crash=set()))
    with env.DB.read() as conn:
        assert list(conn.execute(sa.select(traffic_events.c.id)).scalars()) == [mid]
        assert conn.execute(sa.select(path_stats_hourly.c.requests)).scalar_one() == 1


def test_an_array_message_stores_each_event_and_dead_letters_single_elements(env: Env) -> None:
    """A message holding several events (how HTTP ingest enqueues a request): its valid
    events are stored once even when the batch fails and is redelivered, an element without
    an id takes `<message id>:<index>`, and a bad or too-late element goes to the DLQ alone,
    once, as `<message id>:<index>` with its own body."""
    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(NOW_MS - 2 * HOUR_MS))
    late = NOW_MS - 3 * HOUR_MS
    items = [base(id="a0"), base(id="a1", status=999), base(id=..., path="/no-id"), base(id="a3", ts=late)]
    items.append(base(id="a0"))  # a duplicate within the message
    mid = env.QUEUE.send(items)
    drain(env, FaultyHandler(env.config, fail={0}, crash=set()))
    with env.DB.read() as conn:
        assert sorted(conn.execute(sa.select(traffic_events.c.id)).scalars()) == sorted(["a0", f"{mid}:2"])
        assert conn.execute(sa.select(sa.func.sum(path_stats_hourly.c.requests))).scalar_one() == 2
    dead = dlq_by_id(env)
    assert set(dead) == {f"{mid}:1", f"{mid}:3"} and len(env.QUEUE.dlq_list()) == 2  # once, despite the retry
    assert (dead[f"{mid}:1"]["reason"], dead[f"{mid}:3"]["reason"]) == ("invalid", "too_late")
    assert dead[f"{mid}:1"]["error"].startswith("status: ")
    assert orjson.loads(dead[f"{mid}:1"]["body"]) == items[1]
    assert env.QUEUE.stats()["pending"] == 0


# -- too_late -----------------------------------------------------------------------------


def test_events_older_than_the_archive_watermark_are_too_late(big_env: Env) -> None:
    env = big_env
    watermark = NOW_MS - 2 * HOUR_MS
    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(watermark))
    pairs = make_events(seed=12, n=200, now_ms=NOW_MS, span_ms=4 * HOUR_MS)
    ids = env.QUEUE.send_batch([b for b, _ in pairs])
    drain(env)

    fresh = [t for _, t in pairs if t.ts >= watermark]
    stale = {mid for mid, (_, t) in zip(ids, pairs, strict=True) if t.ts < watermark}
    assert 0 < len(fresh) < len(pairs)
    dead = dlq_by_id(env)
    assert set(dead) == stale
    assert all(d["reason"] == "too_late" and d["error"].startswith("ts: ") for d in dead.values())
    assert env.QUEUE.stats()["dlq_too_late"] == len(stale)
    assert_aggregates_equal(env.DB, expected_aggregates(fresh))


# -- the distinct-path cap ----------------------------------------------------------------


def path_event(i: int, path: str, ts: int) -> dict[str, Any]:
    return base(id=f"e{i}", path=path, ts=ts)


def hourly_requests(env: Env) -> dict[tuple[int, str], int]:
    with env.DB.read() as conn:
        rows = conn.execute(sa.select(path_stats_hourly.c.hour, path_stats_hourly.c.path, path_stats_hourly.c.requests))
        return {(h, p): n for h, p, n in rows}


def test_paths_beyond_the_hourly_cap_count_as_other(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, paths={"max_paths_per_hour": 3}, consumer={"max_batch_size": 4})
    hour_ms = (NOW_MS - 3 * HOUR_MS) // HOUR_MS * HOUR_MS
    hour = hour_ms // 1000
    paths = ["/a", "/b", "/a", "/c", "/d", "/e", "/a", "/d", "/b"]
    bodies = [path_event(i, p, hour_ms + i) for i, p in enumerate(paths)]
    bodies.append(path_event(99, "/d", hour_ms + HOUR_MS + 5))  # another hour: its own budget
    env.QUEUE.send_batch(bodies)
    drain(env)
    assert hourly_requests(env) == {
        (hour, "/a"): 3,
        (hour, "/b"): 2,
        (hour, "/c"): 1,
        (hour, OTHER_PATH): 3,  # /d twice and /e
        (hour + 3600, "/d"): 1,
    }
    with env.DB.read() as conn:
        rows = {
            i: (p, o)
            for i, p, o in conn.execute(
                sa.select(traffic_events.c.id, traffic_events.c.path, traffic_events.c.overflow)
            )
        }
    assert rows["e4"] == ("/d", 1) and rows["e5"] == ("/e", 1) and rows["e7"] == ("/d", 1)
    assert rows["e0"] == ("/a", 0) and rows["e99"] == ("/d", 0)

    # a fresh consumer process (empty cache) keeps the same budget
    env.QUEUE.send_batch([path_event(100, "/f", hour_ms + 100), path_event(101, "/c", hour_ms + 101)])
    drain(env)
    counts = hourly_requests(env)
    assert counts[(hour, OTHER_PATH)] == 4 and counts[(hour, "/c")] == 2


def test_rolled_back_batches_do_not_spend_the_path_budget(db_url: str, make_env: MakeEnv) -> None:
    """Paths admitted by a batch whose transaction rolled back were never stored: they must
    not count against the hour's cap afterwards."""
    env = make_env(db_url, paths={"max_paths_per_hour": 2}, consumer={"max_batch_size": 10, "max_retries": 0})
    hour_ms = (NOW_MS - 3 * HOUR_MS) // HOUR_MS * HOUR_MS
    handler = FaultyHandler(env.config, fail={0, 1, 2}, crash=set())  # the batch, then each half
    env.QUEUE.send_batch([path_event(0, "/gone1", hour_ms), path_event(1, "/gone2", hour_ms + 1)])
    drain(env, handler)
    assert env.QUEUE.stats()["dlq_retries_exhausted"] == 2  # nothing of that batch was stored
    env.QUEUE.send_batch([path_event(2, "/kept1", hour_ms + 2), path_event(3, "/kept2", hour_ms + 3)])
    drain(env, handler)
    hour = hour_ms // 1000
    assert hourly_requests(env) == {(hour, "/kept1"): 1, (hour, "/kept2"): 1}
