"""Replay from the bucket alone: list, verify, export, restore (idempotent, invariant
kept, never re-archived), rebuild into a fresh database, and corrupt objects reported by
name and skipped while the others are processed (through the CLI, exit code 6)."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from freezegun import freeze_time

from archiver import replay
from archiver import verify as replay_verify
from archiver.objects import read_object, read_objects
from pipeline import clock, migrate, totals
from pipeline.bindings.db import Database
from pipeline.cli import main
from pipeline.errors import IntegrityError
from pipeline.schema import OTHER_PATH, archive_objects, path_stats_hourly
from tests import archive_support
from tests.archive_support import consume, event, hot_ids, ms, run_job

archive_url = archive_support.archive_url
archive_env = archive_support.archive_env

NOW = "2026-11-22T02:00:00Z"
FROM, TO = clock.parse_time("2026-11-17T00:00:00Z"), clock.parse_time("2026-11-23T00:00:00Z")
PATHS = ["/a", "/b", "/c", "/d", "/e"]


def _load(env: Any) -> list[dict[str, Any]]:
    """Two archived days plus hot rows; max_paths_per_hour=3 makes some rows overflow."""
    events = []
    for i in range(400):
        ts = ms("2026-11-17T20:00:00Z") + i * 600_000  # every 10 minutes until 2026-11-20T10:40
        events.append(event(i, ts, path=PATHS[i % 5], status=(200, 500, 404, 301)[i % 4]))
    consume(env, events)
    run_job(env, "archive", NOW)
    run_job(env, "clean", NOW)
    return events


def _aggregates(db: Database, h0: float, h1: float) -> list[dict[str, Any]]:
    psh = path_stats_hourly
    with db.read() as conn:
        stmt = sa.select(psh).where(psh.c.hour >= h0, psh.c.hour < h1).order_by(*psh.primary_key.columns)
        return [dict(r) for r in conn.execute(stmt).mappings()]


@freeze_time(NOW)
def test_list_verify_and_rebuild_equal_the_originals(make_env: Any, db_url: str, tmp_path: Path) -> None:
    env = make_env(db_url, paths={"max_paths_per_hour": 3})
    _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    listed = replay.list_objects(store, prefix, FROM, TO)
    assert len(listed) == 30 and sum(o["rows"] for o in listed) == 180
    report = replay_verify.verify(env.DB, store, prefix, FROM, TO)
    assert report["ok"], report
    assert report["archived_rows"] == 180 and report["hot_rows"] == 220
    target = Database(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    migrate.upgrade(target)
    h0, h1 = ms("2026-11-17T20:00:00Z") / 1000, ms("2026-11-19T02:00:00Z") / 1000  # fully archived hours
    result = replay.rebuild(store, prefix, h0, h1, target)
    assert result["ok"] and result["rows"] == 180
    original = _aggregates(env.DB, h0, h1)
    assert any(r["path"] == OTHER_PATH for r in original)
    rebuilt = _aggregates(target, h0, h1)
    for row in original + rebuilt:
        row["rt_sum_ms"] = round(row["rt_sum_ms"], 6)
    assert rebuilt == original
    target.dispose()


@freeze_time(NOW)
def test_verify_catches_a_tampered_aggregate(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _load(env)
    with env.DB.transaction() as conn:
        psh = path_stats_hourly
        hour = ms("2026-11-18T05:00:00Z") // 1000
        conn.execute(sa.update(psh).where(psh.c.hour == hour, psh.c.path == "/a").values(requests=psh.c.requests + 1))
    report = replay_verify.verify(env.DB, env.ARCHIVE, env.config.archive.prefix, FROM, TO)
    assert not report["ok"]
    assert [(m["path"], m["column"], m["database"] - m["archive"]) for m in report["mismatches"]] == [
        ("/a", "requests", 1)
    ]


@freeze_time(NOW)
def test_verify_reports_rows_on_one_side_only_hour_by_hour(make_env: Any, db_url: str) -> None:
    """An aggregate missing from the database (archived hour, hot hour) and one with no
    event behind it (in an hour that holds nothing else) are each reported once."""
    env = make_env(db_url)
    _load(env)
    psh = path_stats_hourly
    archived, hot, empty = (
        ms(t) // 1000 for t in ("2026-11-18T05:00:00Z", "2026-11-20T09:00:00Z", "2026-11-21T12:00:00Z")
    )
    with env.DB.transaction() as conn:
        for hour in (archived, hot):
            conn.execute(sa.delete(psh).where(psh.c.hour == hour, psh.c.path == "/a"))
        row = conn.execute(sa.select(psh).where(psh.c.hour == archived).limit(1)).mappings().one()
        conn.execute(sa.insert(psh).values(dict(row) | {"hour": empty}))
    report = replay_verify.verify(env.DB, env.ARCHIVE, env.config.archive.prefix, FROM, TO)
    got = [(m["hour"], m["path"], m["column"], m["archive"], m["database"]) for m in report["mismatches"]]
    assert sorted(got) == sorted([
        (archived, "/a", "row", True, False),
        (hot, "/a", "row", True, False),
        (empty, row["path"], "row", False, True),
    ])  # fmt: skip
    assert report["archived_rows"] + report["hot_rows"] == 400 and not report["ok"]


@freeze_time(NOW)
def test_restore_is_idempotent_keeps_the_invariant_and_is_never_rearchived(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    before = totals.stats(env.DB)
    first = replay.restore(env.DB, store, prefix, FROM, TO)
    assert first["ok"] and first["rows"] == 180 and first["inserted"] == 180
    assert replay.restore(env.DB, store, prefix, FROM, TO)["inserted"] == 0
    assert totals.stats(env.DB) == before and totals.verify(env.DB)["ok"]
    assert len(hot_ids(env, (2,))) == 180
    assert run_job(env, "archive", "2026-11-23T02:00:00Z")["rows"] == 144  # only the hot rows, never the restored
    assert replay_verify.verify(env.DB, store, prefix, FROM, TO)["ok"]


@freeze_time(NOW)
def test_drop_restored_deletes_only_restored_rows_of_the_range_and_keeps_every_total(
    make_env: Any, db_url: str, tmp_path: Path
) -> None:
    env = make_env(db_url)
    events = _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    before, others = totals.stats(env.DB), sorted(hot_ids(env, (0, 1)))
    replay.restore(env.DB, store, prefix, FROM, TO)
    restored = {e["id"] for e in events if e["ts"] < ms("2026-11-19T02:00:00Z")}
    dropped = {e["id"] for e in events if e["ts"] < ms("2026-11-18T12:00:00Z")}
    res = _cli(tmp_path, env, "replay", "drop-restored", "--to", "2026-11-18T12:00:00Z", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == {"ok": True, "deleted": len(dropped)}
    assert set(hot_ids(env, (2,))) == restored - dropped and len(dropped) == 96
    assert sorted(hot_ids(env, (0, 1))) == others
    assert totals.stats(env.DB) == before and totals.verify(env.DB)["ok"]
    assert replay.drop_restored(env.DB, FROM, TO, batch=50) == {"ok": True, "deleted": len(restored) - len(dropped)}
    assert replay.drop_restored(env.DB, FROM, TO)["deleted"] == 0
    res = _cli(tmp_path, env, "replay", "drop-restored", "--from", "2026-11-21", "--to", "2026-11-20")
    assert res.exit_code == 3 and "--to" in res.stderr and "after --from" in res.stderr
    assert hot_ids(env, (2,)) == [] and sorted(hot_ids(env, (0, 1))) == others
    assert totals.stats(env.DB) == before and replay_verify.verify(env.DB, store, prefix, FROM, TO)["ok"]


@freeze_time(NOW)
def test_long_replays_report_progress_object_by_object(make_env: Any, db_url: str, tmp_path: Path) -> None:
    env = make_env(db_url)
    _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    n = len(replay.objects_in(store, prefix, FROM, TO))
    expected = [(i, n) for i in range(1, n + 1)]
    for run in (
        lambda progress: replay_verify.verify(env.DB, store, prefix, FROM, TO, progress),
        lambda progress: replay.export(store, prefix, FROM, TO, io.StringIO(), progress=progress),
        lambda progress: replay.restore(env.DB, store, prefix, FROM, TO, progress),
        lambda progress: replay.rebuild(store, prefix, FROM, TO, _fresh_db(tmp_path), progress),
    ):
        calls: list[tuple[int, int]] = []
        assert run(lambda done, total, seen=calls: seen.append((done, total)))["ok"]
        assert calls == expected and n > 10


def _fresh_db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    migrate.upgrade(db)
    return db


@freeze_time(NOW)
def test_export_ndjson_and_csv_filtered(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    events = _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    lo, hi = ms("2026-11-18T00:00:00Z"), ms("2026-11-18T06:00:00Z")
    out = io.StringIO()
    result = replay.export(store, prefix, lo / 1000, hi / 1000, out, "ndjson", path="/b")
    rows = [orjson.loads(line) for line in out.getvalue().splitlines()]
    expected = [e["id"] for e in events if lo <= e["ts"] < hi and e["path"] == "/b"]
    assert [r["id"] for r in rows] == expected and result["rows"] == len(expected) > 0
    out = io.StringIO()
    replay.export(store, prefix, lo / 1000, hi / 1000, out, "csv")
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["id"] for r in parsed] == [e["id"] for e in events if lo <= e["ts"] < hi]


def _cli(tmp_path: Path, env: Any, *args: str) -> Any:
    cfg = tmp_path / "edgepipe.toml"
    cfg.write_text(
        f'[bindings]\ndb = "{env.config.bindings.db}"\narchive = "{env.config.bindings.archive}"\n'
        f'[cleaner]\nstats_file = "{tmp_path / "stats.json"}"\n'
    )
    return CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)


@freeze_time(NOW)
def test_corrupt_object_is_named_skipped_and_exit_nonzero(archive_env: Any, tmp_path: Path) -> None:
    env = archive_env()
    _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    keys = [k for k, _h, _s in replay.objects_in(store, prefix, FROM, TO)]
    truncated, garbled = keys[3], keys[10]
    body = store.get_bytes(truncated)
    store.put_bytes(truncated, body[:-20], store.head(truncated).metadata)
    body = bytearray(store.get_bytes(garbled))
    body[len(body) // 2] ^= 0xFF
    store.put_bytes(garbled, bytes(body), store.head(garbled).metadata)
    res = _cli(tmp_path, env, "replay", "verify", "--from", "2026-11-17", "--to", "2026-11-23", "--json")
    assert res.exit_code == 6
    report = json.loads(res.stdout)
    assert sorted(b["key"] for b in report["bad"]) == sorted([truncated, garbled])
    assert report["objects"] == len(keys) - 2 and report["mismatches"] == []
    assert truncated in res.stderr and garbled in res.stderr
    res = _cli(tmp_path, env, "replay", "export", "--from", "2026-11-17", "--to", "2026-11-23")
    assert res.exit_code == 6 and truncated in res.stderr
    assert len(res.stdout.splitlines()) == 180 - _rows(env, truncated, garbled)
    res = _cli(tmp_path, env, "replay", "list", "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == len(keys)


@freeze_time(NOW)
def test_read_objects_keeps_order_reports_bad_ones_in_place_and_stops_early(archive_env: Any) -> None:
    """The prefetching reader behind replay: one result per key in the keys' order, the
    rows of each equal to `read_object`'s, an unsound object as its IntegrityError in its
    place (the others still read), and a reader closed early leaves nothing running."""
    env = archive_env()
    _load(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    keys = [k for k, _h, _s in replay.objects_in(store, prefix, FROM, TO)]
    corrupt = keys[4]
    body = bytearray(store.get_bytes(corrupt))
    body[len(body) // 2] ^= 0xFF
    store.put_bytes(corrupt, bytes(body), store.head(corrupt).metadata)
    wanted = [*keys[:6], "events/dt=2026-11-18/hour=05/part-1-2.ndjson.gz", *keys[6:]]
    got = list(read_objects(store, wanted, ahead=3))
    assert [k for k, _ in got] == wanted
    for key, rows in got:
        if key == corrupt or key not in keys:
            assert isinstance(rows, IntegrityError) and key in str(rows)
        else:
            assert rows == read_object(store, key)
    reader = read_objects(store, keys, ahead=2)
    first_key = next(reader)[0]
    reader.close()
    assert first_key == keys[0]
    assert not [t for t in threading.enumerate() if t.name.startswith("edgepipe-fetch")]


def _rows(env: Any, *keys: str) -> int:
    ao = archive_objects
    with env.DB.read() as conn:
        return int(conn.execute(sa.select(sa.func.sum(ao.c.row_count)).where(ao.c.key.in_(keys))).scalar_one())


def test_db_stream_yields_every_row_of_several_fetches_two_streams_at_once(make_env: Any, db_url: str) -> None:
    """`Database.stream` (the reader verify uses): rows in order across several fetches, as
    plain tuples, bound parameters applied, two open at once on one connection."""
    env = make_env(db_url)
    psh, db = path_stats_hourly, env.DB
    zero = {c.name: 0 for c in psh.columns if c.name not in ("hour", "host", "path", "method")}
    with db.transaction() as conn:
        conn.execute(sa.insert(psh), [zero | {"hour": h * 3600, "host": "h", "path": p, "method": "GET", "requests": h}
                                      for h in range(7) for p in ("/a", "/b")])  # fmt: skip
    stmt = (
        sa.select(psh.c.hour, psh.c.path, psh.c.requests)
        .where(psh.c.hour >= sa.bindparam("lo"), psh.c.hour < sa.bindparam("hi"))
        .order_by(psh.c.hour, psh.c.path)
    )
    want = [(h * 3600, p, h) for h in range(1, 6) for p in ("/a", "/b")]
    with db.read() as conn:
        one = db.stream(conn, stmt, ("lo", "hi"), (3600, 6 * 3600), size=3)
        two = db.stream(conn, stmt, ("hi", "lo"), (6 * 3600, 3600), size=4)
        got = [(next(one), next(two)) for _ in range(4)]
        rest_one, rest_two = list(one), list(two)
    assert [a for a, _b in got] + rest_one == want and [b for _a, b in got] + rest_two == want
    assert all(type(r) is tuple for r in rest_one)


def test_compare_is_exact_but_for_the_rounding_of_the_response_time_sum() -> None:
    """Every column of every row: the sum may differ in its last bits (added in another
    order), the min/max and the counts not at all; rows on one side only are named."""
    from pipeline.aggregate import AGG_COLUMNS

    def row(path: str, **values: Any) -> tuple[Any, ...]:
        base = dict.fromkeys(AGG_COLUMNS, 0) | {"requests": 3, "rt_sum_ms": 0.1 + 0.2 + 0.3, "rt_min_ms": 0.1}
        return (3600, "h", path, "GET", *(base | values).values())

    stored = [row("/a"), row("/b"), row("/c"), row("/d"), row("/e")]
    acc = {r[:4]: list(r[4:]) for r in stored[:4]}
    acc[stored[0][:4]][AGG_COLUMNS.index("rt_sum_ms")] = 0.3 + 0.2 + 0.1  # 0.6 vs 0.6000000000000001
    acc[stored[1][:4]][AGG_COLUMNS.index("rt_sum_ms")] += 1e-3
    acc[stored[2][:4]][AGG_COLUMNS.index("rt_min_ms")] = 0.1 + 1e-15
    acc[stored[3][:4]][-1] = 1  # the last latency bucket
    acc[(3600, "h", "/f", "GET")] = list(row("/f")[4:])
    got = [(m["path"], m["column"]) for m in replay_verify.compare(acc, stored)]
    assert got == [("/b", "rt_sum_ms"), ("/c", "rt_min_ms"), ("/d", AGG_COLUMNS[-1]), ("/e", "row"), ("/f", "row")]
    assert replay_verify.compare({r[:4]: list(r[4:]) for r in stored}, stored) == []


@pytest.mark.parametrize("store", ["file", "moto_server"])
@freeze_time(NOW)
def test_verify_split_between_two_processes_reports_what_one_does(
    make_env: Any, db_url: str, store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A range cut in two at an hour and verified by this process and a helper process
    gives the one-process report: counts, a tampered aggregate and a corrupt object in
    either part. A helper that cannot work leaves its part to this process."""
    bindings = {}
    if store == "moto_server":
        request.getfixturevalue("aws_credentials")
        endpoint = request.getfixturevalue("moto_server")
        bucket = archive_support._bucket(endpoint)
        bindings = {"archive": f"s3://{bucket}/archive?region=us-east-1&endpoint_url={endpoint}&addressing_style=path"}
    env = make_env(db_url, bindings=bindings)
    _load(env)
    store_, prefix = env.ARCHIVE, env.config.archive.prefix
    listing = replay.objects_in(store_, prefix, FROM, TO)
    cut = replay_verify._halving_hour(listing)
    assert cut is not None and listing[0][1] < cut <= listing[-1][1]

    def both() -> tuple[dict[str, Any], dict[str, Any]]:
        one = replay_verify.verify(env.DB, store_, prefix, FROM, TO)
        calls: list[tuple[int, int]] = []
        two = replay_verify.verify(env.DB, store_, prefix, FROM, TO, lambda d, t: calls.append((d, t)), env.config, 1)
        assert calls[-1] == (len(listing), len(listing))
        assert [d for d, _t in calls] == sorted(d for d, _t in calls)
        return one, two

    one, two = both()
    assert one["ok"] and one["processes"] == 1 and two["processes"] == 2
    assert two == one | {"processes": 2} and two["archived_rows"] == 180

    psh = path_stats_hourly
    with env.DB.transaction() as conn:
        for hour in (listing[0][1], listing[-1][1]):  # one in each part
            conn.execute(sa.update(psh).where(psh.c.hour == hour).values(requests=psh.c.requests + 2))
    garbled = listing[-2][0]
    body = bytearray(store_.get_bytes(garbled))
    body[len(body) // 2] ^= 0xFF
    store_.put_bytes(garbled, bytes(body), store_.head(garbled).metadata)
    one, two = both()
    assert not two["ok"] and two == one | {"processes": 2}
    assert [b["key"] for b in two["bad"]] == [garbled] and two["unverified_hours"] == [listing[-2][1]]
    assert {m["hour"] for m in two["mismatches"]} == {listing[0][1], listing[-1][1]}

    unusable = env.config.replace(bindings={"db": f"sqlite:///{tmp_path / 'no-tables.db'}"})
    fallback = replay_verify.verify(env.DB, store_, prefix, FROM, TO, None, unusable, 1)
    assert fallback == one | {"processes": 1}
