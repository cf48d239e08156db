"""The archive job over every DB backend × every object-store backend: exactly once at the
cutoff boundaries, late rows, limits, the watermark, and faults (a failing upload, a
crash between upload and record, a corrupt object)."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any, BinaryIO

import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from archiver import job as archive_job
from archiver import replay
from archiver.objects import KEY_RE, ROW_FIELDS, encode_block, manifest_key, read_object
from pipeline import meta, totals
from pipeline.bindings.archive import ObjectInfo
from pipeline.errors import BindingError
from pipeline.schema import archive_objects, traffic_events
from tests import archive_support
from tests.archive_support import (
    FailingStore,
    ManifestFailingStore,
    bucket_ids,
    consume,
    event,
    hot_ids,
    ms,
    run_job,
)

# Fixtures shared by the archive tests.
archive_url = archive_support.archive_url
archive_env = archive_support.archive_env

NOW = "2026-11-22T02:00:00Z"  # the scheduled run; cutoff = 2026-11-19T02:00:00Z
CUTOFF = "2026-11-19T02:00:00Z"


def _objects(env: Any) -> list[dict[str, Any]]:
    with env.DB.read() as conn:
        return [dict(r) for r in conn.execute(sa.select(archive_objects).order_by(archive_objects.c.key)).mappings()]


@freeze_time(NOW)
def test_cutoff_boundary_row_at_cutoff_stays_hot(archive_env: Any) -> None:
    env = archive_env()
    c = ms(CUTOFF)
    consume(env, [event(1, c - 1000), event(2, c), event(3, c + 1000), event(4, c - 7_200_000)])
    result = run_job(env, "archive", NOW)
    assert (result["objects"], result["rows"]) == (2, 2)
    assert sorted(bucket_ids(env)) == ["ev-1", "ev-4"]
    assert sorted(hot_ids(env, (0,))) == ["ev-2", "ev-3"]
    with env.DB.read() as conn:
        assert meta.archive_watermark_ms(env.DB, conn) == c
    # The consumer now refuses what it could no longer deduplicate, and accepts the cutoff itself.
    late = consume(env, [event(1, c - 1000), event(9, c - 1), event(10, c)])
    assert late == {"inserted": 1, "too_late": 2}
    again = run_job(env, "archive", NOW)
    assert again["objects"] == 0 and again["recovered"] == 0


@freeze_time(NOW)
def test_objects_carry_metadata_and_records(archive_env: Any) -> None:
    env = archive_env()
    base = ms("2026-11-18T05:00:00Z")
    consume(env, [event(i, base + i * 1000) for i in range(50)])
    run_job(env, "archive", NOW)
    (obj,) = _objects(env)
    m = KEY_RE.search(obj["key"])
    assert obj["key"].startswith("events/dt=2026-11-18/hour=05/part-") and m is not None
    assert (int(m[3]), int(m[4])) == (obj["min_seq"], obj["max_seq"])
    assert obj["status"] == "verified" and obj["row_count"] == 50
    assert (obj["min_ts"], obj["max_ts"]) == (base, base + 49_000)
    head = env.ARCHIVE.head(obj["key"])
    assert head.size == obj["size_bytes"]
    assert head.metadata["sha256"] == obj["sha256"] and head.metadata["rows"] == "50"
    assert env.ARCHIVE.digest(obj["key"]) == (obj["size_bytes"], obj["sha256"])
    rows = read_object(env.ARCHIVE, obj["key"])
    assert [r["id"] for r in rows] == [f"ev-{i}" for i in range(50)]
    assert rows[0]["bytes"] == 100 and rows[0]["overflow"] == 0
    assert totals.verify(env.DB)["ok"]


@freeze_time(NOW)
def test_late_and_out_of_order_rows_are_archived_once(archive_env: Any) -> None:
    env = archive_env()
    hour = ms("2026-11-18T07:00:00Z")
    consume(env, [event(i, hour + i) for i in range(10)])
    run_job(env, "archive", NOW)
    # Rows committed after the run for the already-archived hour (a concurrent writer
    # that read the old watermark), one of them with a seq inside the archived range.
    with env.DB.transaction() as conn:
        conn.execute(sa.insert(traffic_events), [
            {"ts": hour + 100 + i, "id": f"late-{i}", "method": "GET", "path": "/l", "status": 200,
             "response_time_ms": 1.0, "host": "", "overflow": 0} for i in range(3)
        ])  # fmt: skip
    second = run_job(env, "archive", NOW)
    assert second["objects"] == 1 and second["rows"] == 3
    ids = bucket_ids(env)
    assert Counter(ids) == Counter([f"ev-{i}" for i in range(10)] + [f"late-{i}" for i in range(3)])
    assert len({o["key"] for o in _objects(env)}) == 2


@freeze_time(NOW)
def test_each_day_gets_a_manifest_rewritten_when_late_rows_arrive_and_replay_ignores_it(archive_env: Any) -> None:
    env = archive_env(archive={"max_rows_per_object": 4})
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    first_day, second_day = ms("2026-11-17T22:00:00Z"), ms("2026-11-18T07:00:00Z")
    consume(env, [event(i, first_day + i * 1000) for i in range(6)] + [event(10 + i, second_day + i) for i in range(3)])
    assert run_job(env, "archive", NOW)["manifests"] == 2

    def manifest(day: str) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(store.get_bytes(manifest_key(prefix, day)))
        of_day = [o for o in _objects(env) if o["key"].startswith(f"{prefix}/dt={day}/")]
        assert doc["day"] == day and doc["format"] == "edgepipe-manifest/1"
        assert [e["key"] for e in doc["entries"]] == [o["key"] for o in of_day]
        for entry in doc["entries"]:
            head = store.head(entry["key"])
            assert (entry["row_count"], entry["size_bytes"]) == (int(head.metadata["rows"]), head.size)
            assert entry["sha256"] == head.metadata["sha256"] and entry["status"] == "verified"
        assert doc["objects"] == len(of_day) and doc["bytes"] == sum(o["size_bytes"] for o in of_day)
        assert doc["rows"] == sum(e["row_count"] for e in doc["entries"])
        return doc

    assert (manifest("2026-11-17")["rows"], manifest("2026-11-17")["objects"]) == (6, 2)
    before = store.get_bytes(manifest_key(prefix, "2026-11-17"))
    assert manifest("2026-11-18")["rows"] == 3
    with env.DB.transaction() as conn:  # late rows for the second day, committed after the run
        conn.execute(sa.insert(traffic_events), [
            {"ts": second_day + 100 + i, "id": f"late-{i}", "method": "GET", "path": "/l", "status": 200,
             "response_time_ms": 1.0, "host": "", "overflow": 0} for i in range(2)
        ])  # fmt: skip
    assert run_job(env, "archive", NOW)["manifests"] == 1
    assert (manifest("2026-11-18")["rows"], manifest("2026-11-18")["objects"]) == (5, 2)
    assert store.get_bytes(manifest_key(prefix, "2026-11-17")) == before
    listed = replay.list_objects(store, prefix, ms("2026-11-17T00:00:00Z") / 1000, ms("2026-11-19T00:00:00Z") / 1000)
    assert [o["key"] for o in listed] == [o["key"] for o in _objects(env)]
    assert sorted(bucket_ids(env)) == sorted([*(f"ev-{i}" for i in (*range(6), 10, 11, 12)), "late-0", "late-1"])


@freeze_time(NOW)
def test_limits_per_object_and_per_run_resume(archive_env: Any) -> None:
    env = archive_env(archive={"max_rows_per_object": 4, "max_objects_per_run": 2})
    hour = ms("2026-11-18T09:00:00Z")
    consume(env, [event(i, hour + i * 10) for i in range(10)])
    consume(env, [event(100 + i, ms("2026-11-18T11:00:00Z") + i) for i in range(3)])  # a later hour, not reached
    consume(env, [event(200, ms(CUTOFF))])  # at the cutoff: not due, never counted as left
    first = run_job(env, "archive", NOW)
    assert (first["objects"], first["rows"], first["complete"], first["remaining_rows"]) == (2, 8, False, 5)
    assert len(hot_ids(env, (0,))) == 5 + 1
    second = run_job(env, "archive", NOW)
    assert (second["objects"], second["rows"], second["complete"], second["remaining_rows"]) == (2, 5, True, 0)
    assert sorted(o["row_count"] for o in _objects(env)) == [2, 3, 4, 4]
    assert sorted(bucket_ids(env)) == sorted([*(f"ev-{i}" for i in range(10)), "ev-100", "ev-101", "ev-102"])


@freeze_time(NOW)
def test_dry_run_changes_nothing(archive_env: Any) -> None:
    env = archive_env()
    consume(env, [event(i, ms("2026-11-17T01:00:00Z") + i) for i in range(5)])
    result = run_job(env, "archive", NOW, dry_run=True)
    assert (result["objects"], result["rows"], result["complete"], result["remaining_rows"]) == (1, 5, False, 5)
    assert _objects(env) == [] and list(env.ARCHIVE.list("")) == []
    with env.DB.read() as conn:
        assert meta.archive_watermark_ms(env.DB, conn) == 0
    assert sorted(hot_ids(env, (0,))) == sorted(f"ev-{i}" for i in range(5))


@freeze_time(NOW)
def test_upload_failing_midway_marks_and_deletes_nothing(archive_env: Any) -> None:
    env = archive_env()
    real = env.ARCHIVE
    consume(env, [event(i, ms("2026-11-18T03:00:00Z") + i) for i in range(20)])
    env.ARCHIVE = FailingStore(real)
    with pytest.raises(BindingError):
        run_job(env, "archive", NOW)
    assert _objects(env) == [] and list(real.list("")) == []
    assert len(hot_ids(env, (0,))) == 20
    assert run_job(env, "clean", NOW)["rows"] == 0
    env.ARCHIVE = real
    result = run_job(env, "archive", NOW)
    assert result["rows"] == 20
    assert sorted(bucket_ids(env)) == sorted(f"ev-{i}" for i in range(20))


@freeze_time(NOW)
def test_manifests_follow_the_objects_written_and_never_fail_the_run(archive_env: Any) -> None:
    """A failing manifest is reported, not fatal; a run that fails at its second object
    still writes the manifest of the first object's day."""
    env = archive_env()
    real, prefix = env.ARCHIVE, env.config.archive.prefix
    consume(env, [event(i, ms("2026-11-17T10:00:00Z") + i) for i in range(3)])
    env.ARCHIVE = ManifestFailingStore(real, fail_puts=0)
    result = run_job(env, "archive", NOW)
    assert (result["objects"], result["rows"], result["manifests"]) == (1, 3, 0)
    assert "BindingError" in result["manifest_error"] and len(hot_ids(env, (1,))) == 3
    with env.DB.transaction() as conn:  # late rows, past the watermark the run raised
        conn.execute(sa.insert(traffic_events), [
            {"ts": ms(t), "id": f"late-{t}", "method": "GET", "path": "/l", "status": 200, "response_time_ms": 1.0,
             "host": "", "overflow": 0} for t in ("2026-11-17T11:00:00Z", "2026-11-18T11:00:00Z")
        ])  # fmt: skip
    env.ARCHIVE = FailingStore(real, fail_puts=0)
    real_put = FailingStore.put

    def second_object_fails(self: FailingStore, key: str, body: BinaryIO, metadata: Any = None) -> ObjectInfo:
        if "dt=2026-11-18/hour=" in key:
            raise BindingError("s3 connection reset during upload")
        return real_put(self, key, body, metadata)

    env.ARCHIVE.put = second_object_fails.__get__(env.ARCHIVE)  # type: ignore[method-assign]
    with pytest.raises(BindingError):
        run_job(env, "archive", NOW)
    doc = orjson.loads(real.get_bytes(manifest_key(prefix, "2026-11-17")))
    assert (doc["objects"], doc["rows"]) == (2, 4)
    assert not list(real.list(f"{prefix}/dt=2026-11-18/"))


@freeze_time(NOW)
def test_crash_between_upload_and_record_leaves_no_duplicate(archive_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = archive_env()
    hour = ms("2026-11-18T04:00:00Z")
    consume(env, [event(i, hour + i) for i in range(10)])

    def killed(*_args: Any) -> None:
        raise KeyboardInterrupt("killed after the upload")

    # A kill runs no cleanup: the object stays in the bucket, the record stays pending.
    monkeypatch.setattr(archive_job, "_mark", killed)
    monkeypatch.setattr(archive_job, "_abandon", lambda *_a: None)
    with pytest.raises(KeyboardInterrupt):
        run_job(env, "archive", NOW)
    assert [o["status"] for o in _objects(env)] == ["pending"]
    assert len(bucket_ids(env)) == 10
    monkeypatch.undo()
    # A row for the same hour committed before the re-run (a writer that read the old
    # watermark): the re-run plans another key, so the orphan must be deleted, not kept.
    with env.DB.transaction() as conn:
        conn.execute(sa.insert(traffic_events).values(
            ts=hour + 500, id="ev-99", method="GET", path="/l", status=200, response_time_ms=1.0, host="", overflow=0
        ))  # fmt: skip
    result = run_job(env, "archive", NOW)
    assert result["recovered"] == 1 and result["rows"] == 11
    assert Counter(bucket_ids(env)) == Counter([f"ev-{i}" for i in range(10)] + ["ev-99"])
    assert [o["status"] for o in _objects(env)] == ["verified"]
    assert totals.check_archive(env.DB) == []  # (the injected row has no aggregate, so only ranges)


@freeze_time(NOW)
def test_corrupt_object_fails_verify_and_cleaner_refuses_it(archive_env: Any) -> None:
    env = archive_env()
    consume(env, [event(i, ms("2026-11-18T06:00:00Z") + i) for i in range(30)])
    consume(env, [event(100 + i, ms("2026-11-18T08:00:00Z") + i) for i in range(5)])
    run_job(env, "archive", NOW)
    bad, good = (o["key"] for o in _objects(env))
    head = env.ARCHIVE.head(bad)
    body = env.ARCHIVE.get_bytes(bad)
    env.ARCHIVE.put(bad, io.BytesIO(body[: len(body) // 2]), head.metadata)  # truncated, same metadata
    result = run_job(env, "clean", NOW)
    assert result["refused"] == [bad] and result["rows"] == 5
    statuses = {o["key"]: o["status"] for o in _objects(env)}
    assert statuses == {bad: "corrupt", good: "cleaned"}
    assert len(hot_ids(env)) == 30
    report = totals.verify(env.DB)
    assert not report["ok"] and any(bad in p for p in report["problems"])
    s = totals.stats(env.DB)
    assert s["hot"]["events"] + s["cold"]["events"] == s["total"]["events"] == 35


@freeze_time(NOW)
def test_head_verify_mode(archive_env: Any) -> None:
    env = archive_env(archive={"verify": "head"})
    consume(env, [event(i, ms("2026-11-18T06:00:00Z") + i) for i in range(3)])
    assert run_job(env, "archive", NOW)["rows"] == 3
    assert [o["status"] for o in _objects(env)] == ["verified"]


def test_encoded_lines_equal_one_dumps_per_row_whatever_the_strings() -> None:
    """A block is one `orjson.dumps` split at `},{"seq":`: strings holding that very text
    (or quotes, braces, newlines) must neither split a row nor change a byte."""
    tricky = ['},{"seq":7', '"},{"seq":', "a\nb", '{"seq":1}', "\\", "é\u2028"]
    rows = [
        (i, 1_000 + i, f"ev-{i}", "GET", s, i % 2, 200 + i, 0.1 + i / 3, s, None if i % 3 else s, None if i % 2 else i)
        for i, s in enumerate(tricky * 3)
    ]
    block = encode_block(rows)
    assert block == b"".join(orjson.dumps(dict(zip(ROW_FIELDS, r, strict=True))) + b"\n" for r in rows)
    assert [tuple(orjson.loads(line).values()) for line in block.splitlines()] == rows
    assert encode_block([]) == b""
