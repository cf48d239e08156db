"""Data quality per hour: `quality_hourly` is written in the consumer's transaction, so its
counts match what the batch did (and a rolled-back batch counts nothing); `edgepipe quality`
and `GET /v1/quality` read the same report."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

from consumers.traffic import TrafficConsumer
from pipeline import meta, quality
from pipeline.env import Env
from pipeline.http.app import create_app
from pipeline.worker import Worker
from tests.conftest import MakeEnv, run_cli
from tests.faults import NOW, NOW_MS, FaultyHandler
from tests.http_support import client_for

HOUR_MS = 3_600_000
CURRENT_HOUR = "2026-11-20T12:00:00Z"  # the hour of tests.faults.NOW


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as f:
        yield f


def ev(i: int, **over: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "ts": NOW_MS - 60_000 - i, "method": "GET", "path": f"/p{i % 2}", "status": 200,
            "response_time_ms": 5} | over  # fmt: skip


def drain(env: Env, handler: Any = None) -> None:
    worker = Worker(env, handler or TrafficConsumer(env.config).handle_batch)
    while worker.step(wait=0) is not None:
        pass
    worker.ctx.close()


def test_every_kind_is_counted_in_the_hour_it_was_handled(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 100}, paths={"max_paths_per_hour": 3})
    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(NOW_MS - 2 * HOUR_MS))
    valid = [ev(i) for i in range(10)]  # paths /p0 and /p1
    overflowing = [ev(100 + i, path=f"/new{i}") for i in range(4)]  # one fits the budget of 3, three overflow
    invalid = [ev(200, status=999), ev(201, status="200"), {"id": "x", "ts": NOW_MS}, ev(203, bytes=-1)]
    too_late = [ev(300, ts=NOW_MS - 3 * HOUR_MS)]
    repeated = [ev(0), ev(1)]  # already in this batch: duplicates
    env.QUEUE.send_batch([*valid, *overflowing, *invalid, *too_late, *repeated])
    drain(env)
    env.QUEUE.send_batch(valid[:5])  # stored already: duplicates of the database's rows
    drain(env)

    doc = quality.report(env.DB, hours=2)
    totals = doc["totals"]
    expected = {"received": 21 + 5, "inserted": 14, "duplicates": 2 + 5, "invalid": 4, "too_late": 1, "overflow": 3}
    assert {k: totals[k] for k in expected} == expected
    assert totals["invalid_by_reason"] == {"bytes": 1, "method": 1, "status": 2}  # the first field missing: method
    assert totals["duplicate_rate"] == round(7 / 26, 6)
    assert totals["invalid_rate"] == round(4 / 26, 6)
    assert [r["hour"] for r in doc["rows"]] == ["2026-11-20T11:00:00Z", CURRENT_HOUR]
    assert doc["rows"][0]["received"] == 0 and doc["rows"][0]["duplicate_rate"] == 0.0  # an hour with nothing
    assert {k: doc["rows"][1][k] for k in expected} == expected


def test_a_failed_batch_counts_nothing_and_its_redelivery_counts_once(env: Env) -> None:
    env.QUEUE.send_batch([ev(i) for i in range(6)])
    drain(env, FaultyHandler(env.config, fail={0}, crash=set()))  # the first attempt rolls back
    totals = quality.report(env.DB, hours=1)["totals"]
    assert (totals["received"], totals["inserted"], totals["duplicates"]) == (6, 6, 0)


def test_hours_are_handled_hours_and_the_window_is_the_last_n(env: Env, frozen: Any) -> None:
    env.QUEUE.send_batch([ev(i) for i in range(3)])
    drain(env)
    frozen.tick(2 * 3600)  # two hours later, events of then
    env.QUEUE.send_batch([ev(10 + i, ts=NOW_MS + 2 * HOUR_MS - 1000 - i) for i in range(5)])
    drain(env)
    doc = quality.report(env.DB, hours=3)
    assert [(r["hour"], r["received"]) for r in doc["rows"]] == [
        ("2026-11-20T12:00:00Z", 3),
        ("2026-11-20T13:00:00Z", 0),
        ("2026-11-20T14:00:00Z", 5),
    ]
    assert doc["from"] == "2026-11-20T12:00:00Z" and doc["to"] == "2026-11-20T15:00:00Z"
    assert quality.report(env.DB, hours=1)["totals"]["received"] == 5


def test_cli_and_api_read_the_same_report(env: Env) -> None:
    env.QUEUE.send_batch([ev(i) for i in range(4)] + [ev(9, status=1000)])
    drain(env)
    expected = quality.report(env.DB, hours=24)

    out = run_cli(env, "quality", "--hours", "24", "--json")
    assert out.exit_code == 0, out.output
    assert orjson.loads(out.output) == expected
    table = run_cli(env, "quality", "--hours", "24")
    assert table.exit_code == 0 and "invalid by field: status 1" in table.output

    async def get(query: str) -> tuple[int, Any]:
        async with client_for(create_app(env)) as client:
            resp = await client.get(f"/v1/quality{query}")
            return resp.status_code, resp.json()

    assert asyncio.run(get("?hours=24")) == (200, expected)
    status, body = asyncio.run(get("?hours=0"))
    assert status == 400 and body["error"] == "validation_error" and "hours" in body["detail"]
    assert run_cli(env, "quality", "--hours", "0").exit_code == 2
