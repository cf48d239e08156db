"""`edgepipe watermark show|repair` on SQLite and PostgreSQL: a watermark that a run
scheduled in the future pushed ahead of the retention policy is lowered to the safe floor,
never below a row that has left (or will leave) the hot table."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import sqlalchemy as sa
from freezegun import freeze_time

from pipeline import clock, meta
from pipeline.schema import archive_objects, job_leases
from tests.archive_support import consume, event, ms, run_job
from tests.conftest import run_cli

NOW = "2026-11-22T02:00:00Z"  # policy cutoff = 2026-11-19T02:00:00Z


def _cli_json(env: Any, *args: str) -> dict[str, Any]:
    result = run_cli(env, *args, "--json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def _watermark(env: Any) -> int:
    with env.DB.read() as conn:
        return meta.archive_watermark_ms(env.DB, conn)


@freeze_time(NOW)
def test_a_watermark_pushed_ahead_is_shown_and_lowered_to_the_safe_floor(env: Any) -> None:
    newest = ms("2026-11-22T01:00:00Z")
    consume(env, [event(1, ms("2026-11-18T05:00:00Z")), event(2, ms("2026-11-21T10:00:00Z")), event(3, newest)])
    # A run scheduled in 2030 (the job function itself: `jobs run --at` refuses it now)
    # archives today's rows and moves the watermark to 2029.
    assert run_job(env, "archive", "2030-01-01T02:00:00Z")["rows"] == 3
    assert consume(env, [event(4, ms("2026-11-22T01:30:00Z"))]) == {"inserted": 0, "too_late": 1}
    shown = _cli_json(env, "watermark", "show")
    floor = clock.iso((newest + 1) / 1000)
    assert shown == {
        "watermark": "2029-12-29T02:00:00Z", "watermark_ms": ms("2029-12-29T02:00:00Z"),
        "policy_cutoff": "2026-11-19T02:00:00Z", "ahead": True, "safe_floor": floor,
    }  # fmt: skip
    repaired = _cli_json(env, "watermark", "repair")
    assert repaired == {"before": "2029-12-29T02:00:00Z", "after": floor, "changed": True}
    assert _watermark(env) == newest + 1 and _cli_json(env, "watermark", "show")["watermark"] == floor
    # Newer than the floor: accepted; older than an archived row: still too late.
    late = consume(env, [event(4, ms("2026-11-22T01:30:00Z")), event(5, ms("2026-11-21T09:00:00Z"))])
    assert late == {"inserted": 1, "too_late": 1}
    assert consume(env, [event(3, newest)]) == {"inserted": 0, "too_late": 1}  # a duplicate of the newest row
    assert _cli_json(env, "watermark", "repair") == {"before": floor, "after": floor, "changed": False}


@freeze_time(NOW)
def test_the_floor_is_the_policy_cutoff_when_archived_rows_are_older(env: Any) -> None:
    consume(env, [event(1, ms("2026-11-18T05:00:00Z"))])
    run_job(env, "archive", "2026-11-25T02:00:00Z")  # three days ahead
    with env.DB.transaction() as conn:  # a replaced object holds nothing: it does not raise the floor
        conn.execute(sa.insert(archive_objects).values(
            key="events/x", hour=ms("2026-11-21T00:00:00Z") // 1000, status="replaced", row_count=1, min_seq=9,
            max_seq=9, max_ts=ms("2026-11-21T00:10:00Z"), created_at=0.0,
        ))  # fmt: skip
    shown = _cli_json(env, "watermark", "show")
    assert (shown["ahead"], shown["safe_floor"]) == (True, "2026-11-19T02:00:00Z")
    repaired = _cli_json(env, "watermark", "repair")
    assert repaired == {"before": "2026-11-22T02:00:00Z", "after": "2026-11-19T02:00:00Z", "changed": True}
    assert _watermark(env) == ms("2026-11-19T02:00:00Z")


@freeze_time(NOW)
def test_a_watermark_not_ahead_is_left_alone(env: Any) -> None:
    empty = _cli_json(env, "watermark", "show")
    assert (empty["watermark"], empty["watermark_ms"], empty["ahead"]) == (None, 0, False)
    assert _cli_json(env, "watermark", "repair") == {"before": None, "after": None, "changed": False}
    consume(env, [event(1, ms("2026-11-18T05:00:00Z"))])
    run_job(env, "archive", "2026-11-22T02:00:30Z")  # within the 60 s slack
    shown = _cli_json(env, "watermark", "show")
    assert (shown["watermark"], shown["ahead"]) == ("2026-11-19T02:00:30Z", False)
    assert _cli_json(env, "watermark", "repair")["changed"] is False
    assert _watermark(env) == ms("2026-11-19T02:00:30Z")


@freeze_time(NOW)
def test_repair_is_refused_while_the_archive_job_runs(env: Any) -> None:
    run_job(env, "archive", "2030-01-01T02:00:00Z")
    with env.DB.transaction() as conn:  # a live holder (pid 1 always exists)
        conn.execute(sa.insert(job_leases).values(job="archive", holder=f"{socket.gethostname()}:1:live00",
                                                  expires_at=clock.now_s() + 300))  # fmt: skip
    refused = run_cli(env, "watermark", "repair")
    assert refused.exit_code == 4 and "archive job is running" in refused.stderr
    assert _watermark(env) == ms("2029-12-29T02:00:00Z")
