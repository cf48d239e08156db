"""Self-repair after failures: a lease held by a dead process of this host, runs by hand
scheduled in the future, manifests that were never written, temp files and multipart
uploads left by killed writes, and archive objects the cleaner flagged corrupt or
mismatch (taken back and rewritten by the next archive run)."""

from __future__ import annotations

import io
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from archiver import job as archive_job
from archiver.objects import manifest_key
from pipeline import clock, log, meta, totals
from pipeline.bindings.archive_file import TMP_DIR, FileStore
from pipeline.bindings.archive_s3 import S3Store
from pipeline.errors import NotFound, ValidationError
from pipeline.jobruns import JobStore, dead_local_holder
from pipeline.schema import archive_objects, job_leases, traffic_events
from scheduler.monitor import report
from scheduler.runner import run_by_hand
from tests import archive_support
from tests.archive_support import REGION, ManifestFailingStore, at, bucket_ids, consume, event, hot_ids, ms, run_job
from tests.conftest import run_cli

archive_url = archive_support.archive_url
archive_env = archive_support.archive_env

NOW = "2026-11-22T02:00:00Z"  # the scheduled run; cutoff = 2026-11-19T02:00:00Z
REPO = Path(__file__).resolve().parent.parent


def _objects(env: Any) -> list[dict[str, Any]]:
    with env.DB.read() as conn:
        return [dict(r) for r in conn.execute(sa.select(archive_objects).order_by(archive_objects.c.key)).mappings()]


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _put_lease(env: Any, job: str, holder: str, ttl: float = 300) -> None:
    with env.DB.transaction() as conn:
        conn.execute(sa.insert(job_leases).values(job=job, holder=holder, expires_at=clock.now_s() + ttl))


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(log.logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="edgepipe")
    return caplog


# -- 1. stale leases --------------------------------------------------------------------


def test_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(env: Any, records: Any) -> None:
    host = socket.gethostname()
    dead = f"{host}:{_dead_pid()}:dead01"
    _put_lease(env, "archive", dead)
    store = JobStore(env.DB)
    assert store.acquire("archive", f"{host}:{os.getpid()}:mine01", 30)
    assert store.leases()["archive"]["holder"] == f"{host}:{os.getpid()}:mine01"
    taken = [r.getMessage() for r in records.records if r.getMessage().startswith("event=lease_taken_over ")]
    assert len(taken) == 1 and f"dead_holder={dead}" in taken[0] and "job=archive" in taken[0]


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param(lambda: f"{socket.gethostname()}:{os.getpid()}:other1", id="live-pid-this-host"),
        pytest.param(lambda: f"{socket.gethostname()}:1:init00", id="pid-1-alive"),
        pytest.param(lambda: f"not-{socket.gethostname()}:{_dead_pid()}:far001", id="dead-pid-other-host"),
        pytest.param(lambda: "a", id="foreign-form"),
        pytest.param(lambda: f"{socket.gethostname()}:0:zero00", id="pid-0"),
    ],
)
def test_a_lease_not_provably_dead_is_respected(env: Any, holder: Any) -> None:
    name = holder()
    _put_lease(env, "archive", name)
    store = JobStore(env.DB)
    assert not dead_local_holder(name)
    assert not store.acquire("archive", f"{socket.gethostname()}:{os.getpid()}:mine02", 30)
    assert store.leases()["archive"]["holder"] == name


CHILD = """
import os, signal, sys, time
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.heartbeat import process_name
from pipeline.jobruns import JobStore

env = open_env(Config().replace(bindings={"db": sys.argv[1], "archive": sys.argv[2]}), check_schema=False)
store, holder = JobStore(env.DB), process_name()
assert store.acquire("archive", holder, 300)
store.start("archive", time.time(), 1, holder)
print(holder, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_jobs_run_after_a_sigkilled_run_takes_the_lease_over(env: Any) -> None:
    """A `jobs run archive` SIGKILLed while holding the lease: the rerun is not refused
    for `lease_seconds`, and the killed attempt is recorded abandoned."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, env.config.bindings.db, env.config.bindings.archive],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    holder = child.stdout.strip()
    assert JobStore(env.DB).leases()["archive"]["holder"] == holder
    rerun = run_cli(env, "jobs", "run", "archive", "--json")
    assert rerun.exit_code == 0, rerun.output
    runs = JobStore(env.DB).history("archive")
    assert [(r["holder"] == holder, r["status"]) for r in runs] == [(False, "succeeded"), (True, "abandoned")]
    assert "archive" not in JobStore(env.DB).leases()


# -- 2. runs by hand in the future ------------------------------------------------------


@freeze_time(NOW)
def test_a_run_by_hand_more_than_60_s_ahead_is_refused(env: Any) -> None:
    consume(env, [event(1, ms("2026-11-21T10:00:00Z")), event(2, ms("2026-11-18T10:00:00Z"))])
    refused = run_cli(env, "jobs", "run", "archive", "--at", "2030-01-01")
    assert refused.exit_code == 3 and "--at" in refused.stderr
    with pytest.raises(ValidationError) as exc:
        run_by_hand(env, "clean", at("2026-11-22T02:01:01Z"))
    assert exc.value.field == "--at"
    with env.DB.read() as conn:
        assert meta.archive_watermark_ms(env.DB, conn) == 0
    assert JobStore(env.DB).history() == [] and _objects(env) == []
    assert run_by_hand(env, "archive", at("2026-11-22T02:01:00Z")).status == "succeeded"  # within 60 s
    assert hot_ids(env, (0,)) == ["ev-1"]


# -- 4a. manifests due ------------------------------------------------------------------


def _due(env: Any) -> list[str]:
    with env.DB.read() as conn:
        return sorted(meta.marks(conn, meta.MANIFEST_DUE))


@freeze_time(NOW)
def test_a_manifest_never_written_stays_due_until_a_later_run_writes_it(
    archive_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = archive_env()
    real, prefix = env.ARCHIVE, env.config.archive.prefix
    consume(env, [event(i, ms("2026-11-18T05:00:00Z") + i) for i in range(4)])
    env.ARCHIVE = ManifestFailingStore(real)
    failed = run_job(env, "archive", NOW)
    assert (failed["objects"], failed["manifests"]) == (1, 0) and "BindingError" in failed["manifest_error"]
    assert _due(env) == ["2026-11-18"]
    with pytest.raises(NotFound):
        real.head(manifest_key(prefix, "2026-11-18"))
    env.ARCHIVE = real
    healed = run_job(env, "archive", NOW)
    assert (healed["objects"], healed["manifests"]) == (0, 1) and "manifest_error" not in healed
    doc = orjson.loads(real.get_bytes(manifest_key(prefix, "2026-11-18")))
    assert [e["key"] for e in doc["entries"]] == [o["key"] for o in _objects(env)] and doc["rows"] == 4
    assert _due(env) == [] and run_job(env, "archive", NOW)["manifests"] == 0
    # A run killed before its manifests (no pass at its end) after archiving a row that a
    # late writer committed for another day: that day stays due.
    with env.DB.transaction() as conn:
        conn.execute(sa.insert(traffic_events).values(
            ts=ms("2026-11-17T05:00:00Z"), id="late-1", method="GET", path="/l", status=200, response_time_ms=1.0,
            host="", overflow=0,
        ))  # fmt: skip
    monkeypatch.setattr(archive_job, "write_due_manifests", lambda *_a: None)
    assert run_job(env, "archive", NOW)["objects"] == 1
    assert _due(env) == ["2026-11-17"]
    monkeypatch.undo()
    assert run_job(env, "archive", NOW)["manifests"] == 1 and _due(env) == []
    assert orjson.loads(real.get_bytes(manifest_key(prefix, "2026-11-17")))["rows"] == 1


# -- 4b. stale temp files and multipart uploads -------------------------------------------


@freeze_time(NOW)
def test_file_store_cleanup_deletes_only_old_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "bucket")
    store.put_bytes("events/a.ndjson.gz", b"kept", {"rows": "1"})
    old, fresh = tmp_path / "bucket" / TMP_DIR / ".x.old.tmp", tmp_path / "bucket" / TMP_DIR / ".y.new.tmp"
    for path, age in ((old, 7200), (fresh, 60)):
        path.write_bytes(b"partial")
        os.utime(path, (clock.now_s() - age, clock.now_s() - age))
    assert store.cleanup(3600) == 1
    assert not old.exists() and fresh.exists() and store.get_bytes("events/a.ndjson.gz") == b"kept"
    assert store.cleanup(3600) == 0


def test_s3_cleanup_aborts_only_old_multipart_uploads_under_its_prefix(aws_credentials: None) -> None:
    """moto reports every upload as initiated at 2010-11-10T20:48:33Z."""
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(Bucket="edgepipe-cleanup")
        store = S3Store("edgepipe-cleanup", "archive", client=client)
        for key in ("archive/events/x.ndjson.gz", "archive/events/y.ndjson.gz", "other/z.ndjson.gz"):
            client.create_multipart_upload(Bucket="edgepipe-cleanup", Key=key)
        with freeze_time("2010-11-10T21:00:00Z"):  # 12 minutes after: still in progress
            assert store.cleanup(3600) == 0
        with freeze_time("2010-11-10T22:00:00Z"):
            assert store.cleanup(3600) == 2
        left = client.list_multipart_uploads(Bucket="edgepipe-cleanup").get("Uploads", [])
        assert [u["Key"] for u in left] == ["other/z.ndjson.gz"]


@freeze_time(NOW)
def test_an_archive_run_first_clears_what_killed_writes_left(archive_env: Any) -> None:
    env = archive_env()
    store = env.ARCHIVE
    if isinstance(store, FileStore):
        leftover = store.root / TMP_DIR / ".part-1-9.ndjson.gz.abc.tmp"
        leftover.write_bytes(b"half an object")
        os.utime(leftover, (clock.now_s() - 7200, clock.now_s() - 7200))
    else:  # an upload whose process died between parts
        store.client.create_multipart_upload(Bucket=store.bucket, Key=store.prefix + "events/dt=2026-11-18/p.gz")
    consume(env, [event(i, ms("2026-11-18T05:00:00Z") + i) for i in range(3)])
    result = run_job(env, "archive", NOW)
    assert (result["tmp_cleaned"], result["rows"]) == (1, 3)
    if isinstance(store, FileStore):
        assert not leftover.exists()
    else:
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert run_job(env, "archive", NOW)["tmp_cleaned"] == 0
    assert run_job(env, "archive", NOW, dry_run=True)["tmp_cleaned"] == 0


# -- 4c. flagged objects ------------------------------------------------------------------


def _damage(env: Any, key: str, how: str) -> None:
    if how == "overwritten":
        env.ARCHIVE.put(key, io.BytesIO(b"not what was stored"), env.ARCHIVE.head(key).metadata)
    elif how == "missing":
        env.ARCHIVE.delete(key)
    else:  # the record no longer agrees with the rows: the cleaner's count check refuses it
        with env.DB.transaction() as conn:
            conn.execute(sa.update(archive_objects).where(archive_objects.c.key == key).values(row_count=31))


def _archive_corrupt_alerts(env: Any) -> list[str]:
    return [a for a in report(env)["alerts"] if a.startswith("archive_corrupt:")]


@freeze_time(NOW)
@pytest.mark.parametrize(("how", "flag"), [("overwritten", "corrupt"), ("missing", "corrupt"),
                                           ("miscounted", "mismatch")])  # fmt: skip
def test_the_next_archive_run_replaces_a_flagged_object(archive_env: Any, how: str, flag: str) -> None:
    env = archive_env()
    prefix = env.config.archive.prefix
    consume(env, [event(i, ms("2026-11-18T06:00:00Z") + i) for i in range(30)])
    consume(env, [event(100 + i, ms("2026-11-18T08:00:00Z") + i) for i in range(5)])
    run_job(env, "archive", NOW)
    bad, good = (o["key"] for o in _objects(env))
    _damage(env, bad, how)
    assert run_job(env, "clean", NOW)["refused"] == [bad]
    assert {o["key"]: o["status"] for o in _objects(env)} == {bad: flag, good: "cleaned"}
    assert run_cli(env, "verify").exit_code == 6
    (alert,) = _archive_corrupt_alerts(env)
    assert alert == f"archive_corrupt: 1 objects flagged corrupt/mismatch ({bad})"

    result = run_job(env, "archive", NOW)
    assert (result["repaired"], result["objects"], result["rows"]) == (1, 1, 30)
    objects = {o["key"]: o for o in _objects(env)}
    assert objects[bad]["status"] == "replaced" and objects[bad]["error"].startswith(f"replaced: was {flag}: ")
    (new,) = set(objects) - {bad, good}
    assert new == bad.replace(".ndjson.gz", "-r1.ndjson.gz") and objects[new]["status"] == "verified"
    with pytest.raises(NotFound):
        env.ARCHIVE.head(bad)
    assert sorted(bucket_ids(env)) == sorted([f"ev-{i}" for i in range(30)] + [f"ev-{100 + i}" for i in range(5)])
    doc = orjson.loads(env.ARCHIVE.get_bytes(manifest_key(prefix, "2026-11-18")))
    assert sorted(e["key"] for e in doc["entries"]) == sorted([good, new]) and doc["rows"] == 35
    checked = run_cli(env, "verify", "--json")
    assert checked.exit_code == 0, checked.output
    assert _archive_corrupt_alerts(env) == []
    assert (report(env)["archive"]["objects"], report(env)["archive"]["rows"]) == (2, 35)  # not the replaced one

    cleaned = run_job(env, "clean", NOW)
    assert (cleaned["rows"], cleaned["refused"]) == (30, [])
    s = totals.stats(env.DB)
    assert s["hot"]["events"] == 0 and s["hot"]["events"] + s["cold"]["events"] == s["total"]["events"] == 35
    assert totals.verify(env.DB)["ok"] and run_job(env, "archive", NOW)["repaired"] == 0


@freeze_time(NOW)
def test_a_partly_cleaned_flagged_object_is_left_to_an_operator(
    make_env: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its cleaned rows exist only in that object: the run does not delete it."""
    env = make_env(db_url, cleaner={"batch_size": 10, "max_run_seconds": 0.001})
    consume(env, [event(i, ms("2026-11-18T06:00:00Z") + i) for i in range(30)])
    run_job(env, "archive", NOW)
    with monkeypatch.context() as m:  # a clock that ticks 1 s a reading: the budget stops the run after one batch
        m.setattr(clock, "monotonic", itertools.count().__next__)
        assert run_job(env, "clean", NOW)["rows"] == 10
    (bad,) = (o["key"] for o in _objects(env))
    _damage(env, bad, "overwritten")
    assert run_job(env, "clean", NOW)["refused"] == [bad]
    result = run_job(env, "archive", NOW)
    assert (result["repaired"], result["repair_skipped"], result["objects"]) == (0, [bad], 0)
    assert [o["status"] for o in _objects(env)] == ["corrupt"] and len(hot_ids(env, (1,))) == 20
    assert len(_archive_corrupt_alerts(env)) == 1 and not totals.verify(env.DB)["ok"]
