"""Backups through the ARCHIVE binding (`archiver.backup`, `edgepipe backup …`): a populated
SQLite or PostgreSQL database backed up to a directory or to moto's S3 server and restored
into a fresh database answers every read command as the original does; restores across
dialects hold the same rows; a truncated, corrupt or incomplete backup is named and
refused; retention keeps exactly the documented set; a backup taken while a worker
consumes never fails a batch and holds a consistent snapshot."""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from archiver import backup
from consumers.traffic import TrafficConsumer
from pipeline import audit, clock, meta, migrate, totals
from pipeline.bindings.db import Database
from pipeline.env import Env
from pipeline.jobs import JOBS
from pipeline.schema import metadata
from pipeline.worker import Worker
from tests.archive_support import REGION, at, consume, event
from tests.conftest import run_cli
from tests.support import scratch_db

START = "2026-11-16T00:00:00Z"
NOW = "2026-11-20T12:00:00Z"
ODD_TEXT = "tab\there, newline\nhere, backslash \\ and \\N, quote ' \" and ünïcode"
ODD_BYTES = b"\x00\t\n\\N\\x00\xff"
READS: list[tuple[str, ...]] = [
    ("stats", "--json"),
    ("verify", "--json"),
    ("paths", "top", "--hours", "240", "--limit", "50", "--json"),
    ("paths", "hourly", "--json"),
    ("paths", "daily", "--json"),
    ("tokens", "list", "--json"),
    ("jobs", "history", "--limit", "1000", "--json"),
    ("snapshot", "show", "--json"),
    ("snapshot", "list"),
    ("queue", "stats", "--json"),
    ("queue", "dlq", "list", "--json"),
    ("watermark", "show", "--json"),
    ("replay", "list", "--json"),
]


@pytest.fixture(params=["file", "moto_server"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty bucket: a directory, or a bucket on moto's S3 server over real HTTP."""
    if request.param == "file":
        return f"file://{tmp_path / 'bucket'}"
    request.getfixturevalue("aws_credentials")
    endpoint = request.getfixturevalue("moto_server")
    bucket = f"edgepipe-{secrets.token_hex(4)}"
    boto3.client("s3", region_name=REGION, endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/deploy?region={REGION}&endpoint_url={endpoint}&addressing_style=path"


@pytest.fixture
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """`fresh_db("sqlite" | "postgres")`: the URL of a new, empty database (a file, or a
    throwaway schema on the test server)."""
    with contextlib.ExitStack() as stack:

        def make(kind: str) -> str:
            if kind == "sqlite":
                return f"sqlite:///{tmp_path / f'restored-{secrets.token_hex(3)}.db'}"
            return stack.enter_context(scratch_db(request.getfixturevalue("pg_server_url"), tmp_path))

        yield make


def _kind(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def _cli_json(env: Env, *args: str, db: str | None = None) -> Any:
    result = run_cli(env, *args, environ={"EDGEPIPE_BINDINGS__DB": db} if db else None)
    assert result.exit_code == 0, (args, result.output)
    return orjson.loads(result.stdout)


def populate(env: Env) -> int:
    """Four days of traffic with duplicates and a poison message, archived and cleaned
    nightly; then a token, a snapshot, a job run by hand, odd text and bytes in the KV and
    meta tables. Returns the unique events accepted."""
    rng = random.Random(5)
    accepted: set[str] = set()
    base = int(clock.parse_time(START) * 1000)
    for day in range(4):
        with freeze_time(at(START) + timedelta(days=day, hours=23)):
            events = [
                event(day * 1000 + i, base + day * 86_400_000 + rng.randrange(0, 3 * 3_600_000),
                      path=f"/p{rng.randrange(5)}", status=rng.choice((200, 404, 500)))
                for i in range(120)
            ]  # fmt: skip
            poison = {"id": f"bad-{day}", "ts": "yesterday", "method": "GET", "path": "/x"}
            consume(env, [*events, *rng.sample(events, 20), poison])
            accepted |= {e["id"] for e in events}
        for job, hour in (("rollup", 0), ("archive", 2), ("clean", 3)):
            when = at(START) + timedelta(days=day + 1, hours=hour)
            with freeze_time(when):
                JOBS[job](env, when, False)
    with freeze_time(NOW):
        by_hand = (("tokens", "create", "ops", "--scope", "read"), ("snapshot", "refresh"), ("jobs", "run", "monitor"))
        for args in by_hand:
            assert run_cli(env, *args).exit_code == 0, args
        env.require_kv().put("odd\tkey\\N", ODD_BYTES, metadata={"note": ODD_TEXT})
        with env.DB.transaction() as conn:
            meta.put(env.DB, conn, "test.odd", ODD_TEXT)
    return len(accepted)


def reads(env: Env, db: str | None = None) -> dict[tuple[str, ...], tuple[int, str]]:
    """Every read command's exit code and output, on `db` (default: the env's database)."""
    with freeze_time(NOW):
        out = {}
        for args in READS:
            r = run_cli(env, *args, environ={"EDGEPIPE_BINDINGS__DB": db} if db else None)
            out[args] = (r.exit_code, r.stdout)
    return out


def table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every edgepipe table's rows, in primary-key order, as Python values."""
    db = Database(url)
    try:
        with db.read() as conn:
            return {
                t.name: [tuple(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns))]
                for t in metadata.sorted_tables
            }
    finally:
        db.dispose()


def test_backup_and_restore_answers_every_read_command_as_the_original(
    make_env: Any, db_url: str, store_url: str, fresh_db: Any
) -> None:
    env = make_env(db_url, bindings={"archive": store_url})
    unique = populate(env)
    with freeze_time(NOW):
        made = _cli_json(env, "backup", "create", "--json")
    assert made["payload"] == ("sqlite" if _kind(db_url) == "sqlite" else "pgcopy")
    assert made["schema"] == migrate.HEAD_REVISION
    original = table_rows(db_url)
    assert made["tables"] == {name: len(rows) for name, rows in original.items()}
    assert made["tables"]["traffic_events"] > 0 and made["tables"]["lifetime_totals"] == 1
    listed = _cli_json(env, "backup", "list", "--json")
    assert [(b["id"], b["status"], b["rows"], b["sha256"]) for b in listed] == [
        (made["id"], "complete", made["rows"], made["sha256"])
    ]

    target = fresh_db(_kind(db_url))
    with freeze_time(NOW):
        restored = _cli_json(env, "backup", "restore", made["id"], "--into", target, "--json")
    assert (restored["id"], restored["rows"], restored["tables"]) == (made["id"], made["rows"], made["tables"])
    expected = reads(env)
    assert all(code == 0 for code, _ in expected.values())
    assert reads(env, target) == expected
    before = _cli_json(env, "audit", "--limit", "1000", "--json")
    after = _cli_json(env, "audit", "--limit", "1000", "--json", db=target)
    assert after[:-1] == before
    assert after[-1]["action"] == "backup.restore" and after[-1]["actor"] == audit.cli_actor().name
    assert after[-1]["params"]["id"] == made["id"] and after[-1]["params"]["rows"] == made["rows"]

    # the restored database goes on as a deployment: new rows get fresh keys
    later = make_env(target, bindings={"archive": store_url})
    with freeze_time(NOW):
        new = [event(50_000 + i, int(clock.parse_time(NOW) * 1000) - 60_000) for i in range(30)]
        assert consume(later, new)["inserted"] == 30
        assert run_cli(later, "tokens", "create", "second").exit_code == 0
    s = totals.stats(later.DB)
    assert s["total"]["events"] == unique + 30 and totals.verify(later.DB)["ok"]
    assert [t["name"] for t in _cli_json(later, "tokens", "list", "--json")] == ["ops", "second"]


@pytest.mark.postgres
@pytest.mark.parametrize("source,target", [("sqlite", "postgres"), ("postgres", "sqlite")])
def test_a_backup_restores_into_the_other_dialect(
    make_env: Any, tmp_path: Path, fresh_db: Any, source: str, target: str
) -> None:
    env = make_env(fresh_db(source))
    unique = populate(env)
    with freeze_time(NOW):
        made = backup.create(env)
    into = fresh_db(target)
    out = Database(into)
    try:
        backup.restore(env.require_archive(), made["id"], out, audit.cli_actor())
    finally:
        out.dispose()
    original, copy = table_rows(env.config.bindings.db), table_rows(into)
    assert copy.pop("audit_log")[:-1] == original.pop("audit_log")
    assert copy == original
    assert ODD_BYTES in [r[1] for r in copy["kv_entries"]]
    later = make_env(into)
    with freeze_time(NOW):
        assert consume(later, [event(60_000 + i, int(clock.parse_time(NOW) * 1000)) for i in range(5)])["inserted"] == 5
    assert totals.stats(later.DB)["total"]["events"] == unique + 5 and totals.verify(later.DB)["ok"]


def _create_at(env: Env, when: str) -> dict[str, Any]:
    with freeze_time(when):
        return backup.create(env)


def _damage(env: Env, made: dict[str, Any], how: str) -> None:
    store = env.require_archive()
    body = store.get_bytes(made["key"])
    if how == "truncated":
        store.put_bytes(made["key"], body[: len(body) // 2])
    else:
        middle = len(body) // 2
        store.put_bytes(made["key"], body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :])


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_a_damaged_backup_is_named_and_refused(
    make_env: Any, sqlite_url: str, store_url: str, fresh_db: Any, how: str
) -> None:
    env = make_env(sqlite_url, bindings={"archive": store_url})
    populate(env)
    good, bad = (_create_at(env, when) for when in ("2026-11-20T12:00:00Z", "2026-11-20T12:00:01Z"))
    _damage(env, bad, how)

    verified = run_cli(env, "backup", "verify", "--all", "--json")
    assert verified.exit_code == 6
    report = orjson.loads(verified.stdout)
    assert [(b["id"], b["ok"]) for b in report["backups"]] == [(good["id"], True), (bad["id"], False)]
    assert report["backups"][0]["totals_ok"] is True
    assert f"edgepipe: backup {bad['id']}: {bad['key']} is {how}" in verified.stderr
    assert run_cli(env, "backup", "verify").exit_code == 6  # the newest: the damaged one

    target = fresh_db("sqlite")
    refused = run_cli(env, "backup", "restore", bad["id"], "--into", target)
    assert refused.exit_code == 6 and bad["id"] in refused.stderr and how in refused.stderr
    empty = Database(target)
    try:
        assert empty.occupied_tables() == []
    finally:
        empty.dispose()
    assert run_cli(env, "backup", "restore", good["id"], "--into", target).exit_code == 0  # the target stayed usable
    original, copy = table_rows(sqlite_url), table_rows(target)
    assert copy.pop("audit_log")[:-1] == original.pop("audit_log") and copy == original


def test_restore_refuses_a_database_that_holds_rows_and_a_missing_backup(
    make_env: Any, sqlite_url: str, fresh_db: Any
) -> None:
    env = make_env(sqlite_url)
    populate(env)
    made = backup.create(env)
    target = fresh_db("sqlite")
    other = make_env(target)
    consume(other, [event(1, int(clock.parse_time(NOW) * 1000))])
    rows = table_rows(target)
    refused = run_cli(env, "backup", "restore", "--into", target)
    assert refused.exit_code == 3 and "not empty" in refused.stderr and "traffic_events" in refused.stderr
    assert table_rows(target) == rows
    assert run_cli(env, "backup", "restore", "20260101T000000Z-0000", "--into", fresh_db("sqlite")).exit_code == 5
    assert run_cli(env, "backup", "restore", "latest!", "--into", fresh_db("sqlite")).exit_code == 3
    assert run_cli(env, "backup", "restore", made["id"], "--into", fresh_db("sqlite")).exit_code == 0


def test_an_incomplete_backup_is_listed_as_such_and_never_restored(
    make_env: Any, sqlite_url: str, fresh_db: Any
) -> None:
    env = make_env(sqlite_url)
    populate(env)
    good, cut = (_create_at(env, when) for when in ("2026-11-20T12:00:00Z", "2026-11-20T12:00:01Z"))
    env.require_archive().delete(backup.manifest_key(cut["id"]))  # a run killed before its manifest
    listed = _cli_json(env, "backup", "list", "--json")
    assert [(b["id"], b["status"]) for b in listed] == [(good["id"], "complete"), (cut["id"], "incomplete")]
    restored = _cli_json(env, "backup", "restore", "--into", fresh_db("sqlite"), "--json")
    assert restored["id"] == good["id"]  # the newest COMPLETE backup
    refused = run_cli(env, "backup", "restore", cut["id"], "--into", fresh_db("sqlite"))
    assert refused.exit_code == 6 and f"backup {cut['id']}: incomplete" in refused.stderr

    garbled = _create_at(env, "2026-11-20T12:00:02Z")
    env.require_archive().put_bytes(backup.manifest_key(garbled["id"]), b'{"format": "edgepipe-backup/1"')
    assert _cli_json(env, "backup", "list", "--json")[-1]["status"] == "unreadable"
    verified = run_cli(env, "backup", "verify", garbled["id"])
    assert (
        verified.exit_code == 6
        and f"edgepipe: backup {garbled['id']}: its manifest is not valid JSON" in verified.stderr
    )
    with freeze_time("2026-12-20T12:00:00Z"):
        pruned = _cli_json(env, "backup", "prune", "--json")
    assert pruned["unreadable"] == [garbled["id"]] and pruned["incomplete_deleted"] == [cut["id"]]
    assert [b.id for b in backup.entries(env.require_archive())] == [good["id"], garbled["id"]]


def _backup_at(env: Env, when: str | datetime, complete: bool = True) -> str:
    with freeze_time(when):
        made = backup.create(env)
    if not complete:
        env.require_archive().delete(backup.manifest_key(made["id"]))
    return str(made["id"])


def test_retention_keeps_exactly_the_documented_set(make_env: Any, sqlite_url: str) -> None:
    """keep_daily 7, keep_weekly 4 at Friday 2026-11-20 12:00 UTC (ISO week 47, Monday
    16 to Sunday 22): the newest backup of each day 14..20 November, of each ISO week 47,
    46, 45 and 44 (the 8th and the 1st November are their newest), nothing else complete;
    an incomplete backup older than a day goes, a younger one stays."""
    env = make_env(sqlite_url, backup={"keep_daily": 7, "keep_weekly": 4})
    first = datetime(2026, 10, 10, 1, tzinfo=UTC)
    daily = {(first + timedelta(days=d)).date(): _backup_at(env, first + timedelta(days=d)) for d in range(42)}
    extra_14 = _backup_at(env, "2026-11-14T13:00:00Z")
    extra_19 = _backup_at(env, "2026-11-19T13:00:00Z")
    old_cut = _backup_at(env, "2026-11-18T20:00:00Z", complete=False)
    young_cut = _backup_at(env, "2026-11-20T11:00:00Z", complete=False)
    day = {d.day if d.month == 11 else -d.day: backup_id for d, backup_id in daily.items()}
    expected = {day[1], day[8], extra_14, day[15], day[16], day[17], day[18], extra_19, day[20]}

    with freeze_time(NOW):
        dry = _cli_json(env, "backup", "prune", "--dry-run", "--json")
        assert len(backup.entries(env.require_archive())) == 42 + 4  # nothing deleted
        result = _cli_json(env, "backup", "prune", "--json")
    for report in (dry, result):
        assert {k["id"] for k in report["kept"]} == expected
        assert set(report["deleted"]) == set(daily.values()) - expected  # 10 October .. 20 November, 01:00
        assert report["incomplete_deleted"] == [old_cut]
    reasons = {k["id"]: k["reasons"] for k in result["kept"]}
    assert reasons[day[20]] == ["daily 2026-11-20", "weekly 2026-W47", "newest"]
    assert reasons[day[1]] == ["weekly 2026-W44"] and reasons[extra_14] == ["daily 2026-11-14"]
    left = {b.id: b.status for b in backup.entries(env.require_archive())}
    assert left == dict.fromkeys(expected, "complete") | {young_cut: "incomplete"}


def test_retention_never_leaves_no_backup_and_keeps_the_future(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, backup={"keep_daily": 0, "keep_weekly": 0})
    old = [_backup_at(env, f"2026-09-0{d}T01:00:00Z") for d in (1, 2, 3)]
    ahead = _backup_at(env, "2026-12-24T01:00:00Z")
    kept = backup.keep(backup.entries(env.require_archive()), clock.parse_time(NOW), 0, 0)
    assert kept == {old[-1]: ["newest"], ahead: ["future"]}
    with freeze_time(NOW):
        assert run_cli(env, "backup", "prune").exit_code == 0
    assert [b.id for b in backup.entries(env.require_archive())] == [old[-1], ahead]


def test_the_backup_job_backs_up_then_prunes(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url, backup={"keep_daily": 2, "keep_weekly": 0})
    populate(env)
    ids = []
    for d in (17, 18, 19, 20):
        when = at(f"2026-11-{d}T01:00:00Z")
        with freeze_time(when):
            result = JOBS["backup"](env, when, False)
        ids.append(result["id"])
        assert result["rows"] > 0 and result["size"] > 0
    assert result["deleted"] == [ids[1]] and result["kept"] == 2
    assert [b.id for b in backup.entries(env.require_archive())] == ids[2:]
    with freeze_time(NOW):
        dry = JOBS["backup"](env, at(NOW), True)
    assert dry["id"] is None and dry["deleted"] == [] and len(backup.entries(env.require_archive())) == 2


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_backup_taken_while_a_worker_consumes(make_env: Any, fresh_db: Any, kind: str) -> None:
    """The worker commits batches while the backup holds its snapshot (it would wait for a
    lock, and its batches fail, if the backup blocked writers), and goes on consuming while
    the copy is streamed and uploaded: no batch fails, the totals are exact, and the backup
    holds exactly the events committed before its snapshot."""
    env = make_env(fresh_db(kind), consumer={"max_batch_size": 50})
    now_ms = int(clock.parse_time(NOW) * 1000)
    events = [event(i, now_ms - 3_600_000 + i * 100, path=f"/p{i % 7}") for i in range(3000)]
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    held, resume = threading.Event(), threading.Event()
    made: dict[str, Any] = {}

    def hold() -> None:
        held.set()
        assert resume.wait(60), "the worker never committed while the snapshot was held"

    def take_backup() -> None:
        made.update(backup.create(env, on_snapshot=hold))

    results = []
    with freeze_time(NOW):
        env.QUEUE.send_batch(events)
        for _ in range(10):
            results.append(worker.step(wait=0))
        before = sum(r.report.inserted for r in results)
        thread = threading.Thread(target=take_backup)
        thread.start()
        assert held.wait(60)
        for _ in range(10):  # committed while the snapshot is held
            results.append(worker.step(wait=0))
        resume.set()
        while (result := worker.step(wait=0)) is not None:  # while the copy streams
            results.append(result)
        thread.join(120)
    assert not thread.is_alive() and made
    assert all(r is not None and r.ok for r in results)
    assert sum(r.report.inserted for r in results) == 3000
    assert totals.stats(env.DB)["total"]["events"] == 3000 and totals.verify(env.DB)["ok"]
    assert made["tables"]["traffic_events"] == before == 500
    into = Database(fresh_db("sqlite"))
    try:
        backup.restore(env.require_archive(), made["id"], into, audit.cli_actor())
        s = totals.stats(into)
        assert s["total"]["events"] == s["hot"]["events"] == 500 and totals.verify(into)["ok"]
    finally:
        into.dispose()


def test_pgcopy_payload_round_trips_odd_values_and_refuses_a_cut_one() -> None:
    """The COPY text parser: escapes, NULLs and bytea as PostgreSQL writes them; a section
    cut short is an integrity error, not rows quietly lost."""
    from pipeline.bindings.db import backup as db_backup

    payload = (
        b"-- edgepipe backup: PostgreSQL COPY sections (pgcopy), schema 0003\n"
        b'COPY "edgepipe_meta" ("key", "value") FROM stdin;\n'
        b"a\ttab\\there\\nnew \\\\N back\\\\slash\n"
        b'\\.\nCOPY "kv_entries" ("key", "value", "metadata", "expiration") FROM stdin;\n'
        b"\\\\x6b\t\\\\x00090a5c\t\\N\t12.5\n\\.\n"
    )
    sections = list(db_backup._copy_sections(iter([payload[i : i + 7] for i in range(0, len(payload), 7)])))
    assert [name for name, _, _ in sections] == ["edgepipe_meta", "kv_entries"]
    engine_rows = {}
    for name, columns, pieces in db_backup._copy_sections(iter([payload])):
        first = next(pieces)
        engine_rows[name] = list(db_backup._parse_copy(name, columns, pieces, first))
    assert engine_rows["edgepipe_meta"] == [("a", "tab\there\nnew \\N back\\slash")]
    assert engine_rows["kv_entries"] == [(b"k", b"\x00\t\n\\", None, 12.5)]
    with pytest.raises(Exception, match="truncated"):
        for _name, _columns, pieces in db_backup._copy_sections(iter([payload[:-20]])):
            list(pieces)


def test_bench_backup_times_real_backups_and_consumes_every_event_once() -> None:
    """The benchmark's harness on a small run: its reference compresses as the backup does,
    the consumer beside the backup loses no event; its figures are not judged."""
    from pipeline.bench import backup as bench

    assert bench.LEVEL == backup.COMPRESS_LEVEL
    result = bench.run(3000, batch_size=100)
    assert result["exact"] and result["backup_rows"] > 3000 and len(result["round_ratios"]) == bench.ROUNDS
    assert 600 <= result["events_consumed"] <= result["events_queued"] == 3000
    for key in ("rows_per_s", "mb_per_s", "reference_mb_per_s", "ratio", "consumer_events_per_s", "backup_mb"):
        assert result[key] > 0, key


def test_a_backup_larger_than_the_multipart_threshold(make_env: Any, sqlite_url: str, store_url: str) -> None:
    """A payload of several S3 parts (`[archive] multipart_threshold`, 5 MiB at least)
    streams through the compressing reader part by part and restores byte for byte."""
    env = make_env(sqlite_url, bindings={"archive": store_url}, archive={"multipart_threshold": 5 * 1024 * 1024})
    blobs = {f"blob-{i}": random.Random(i).randbytes(4 * 1024 * 1024) for i in range(3)}  # incompressible
    for key, value in blobs.items():
        env.require_kv().put(key, value)
    made = backup.create(env)
    assert made["size"] > 12 * 1024 * 1024
    assert env.require_archive().digest(made["key"]) == (made["size"], made["sha256"])
    into = Database(f"sqlite:///{Path(sqlite_url.removeprefix('sqlite:///')).parent / 'copy.db'}")
    try:
        backup.restore(env.require_archive(), made["id"], into, audit.cli_actor())
        with into.read() as conn:
            stored = dict(conn.exec_driver_sql("SELECT key, value FROM kv_entries").all())
        assert {k.decode(): v for k, v in stored.items()} == blobs
    finally:
        into.dispose()
