"""Read API and operational endpoints: top paths (snapshot vs aggregates), hourly rows with
cursor paging, stats, jobs, archive objects, /health, /ready (incl. a store that is down),
/metrics, the OpenAPI document and the tokens CLI."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import snapshots
from pipeline import clock, queries
from pipeline.cli import main
from pipeline.config import Config
from pipeline.env import open_env
from pipeline.http.app import create_app
from pipeline.schema import archive_objects, job_runs, worker_heartbeats
from tests.http_support import client_for, consume_all, event

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _seed(env: Any, n: int = 300) -> list[dict[str, Any]]:
    now = clock.now_ms()
    events = [event(i, ts=now - (i % 30) * 3_600_000 - 1000, path=f"/p/{i % 11}x") for i in range(n)]
    env.QUEUE.send_batch(events)
    consume_all(env)
    return events


def _heartbeat(env: Any, age_s: float = 0.0, state: str = "running") -> None:
    now = clock.now_s()
    with env.DB.transaction() as conn:
        conn.execute(
            worker_heartbeats.insert().values(
                holder="w1", host="h", pid=1, state=state, started_at=now - 100, last_seen_at=now - age_s
            )
        )


async def test_hourly_every_row_and_cursor_paging(env: Any) -> None:
    _seed(env)
    expected = list(queries.hourly(env.DB))
    app = create_app(env)
    async with client_for(app) as c:
        full = (await c.get("/v1/paths/hourly")).json()
        pages, cursor = [], None
        while True:
            params = {"limit": 37} | ({"cursor": cursor} if cursor else {})
            page = (await c.get("/v1/paths/hourly", params=params)).json()
            pages.extend(page["rows"])
            cursor = page["next"]
            if cursor is None:
                break
        one = (await c.get("/v1/paths/hourly", params={"path": "/p/3x", "method": "get"})).json()
        start_h = int(clock.now_s()) // 3600 * 3600 - 10 * 3600
        window = await c.get("/v1/paths/hourly", params={"from": clock.iso(start_h), "to": str(start_h + 6 * 3600)})
        bad_time = await c.get("/v1/paths/hourly", params={"from": "yesterday"})
        bad_cursor = await c.get("/v1/paths/hourly", params={"cursor": "garbage"})
        bad_limit = await c.get("/v1/paths/hourly", params={"limit": 0})
    assert full["rows"] == expected and full["next"] is None
    assert pages == expected
    assert one["rows"] and {(r["path"], r["method"]) for r in one["rows"]} == {("/p/3x", "GET")}
    hours = {r["hour"] for r in window.json()["rows"]}
    assert hours == {clock.iso(start_h + k * 3600) for k in range(6)}
    for r, field in ((bad_time, "from"), (bad_cursor, "cursor"), (bad_limit, "limit")):
        assert r.status_code == 400
        assert r.json()["error"] == "validation_error" and r.json()["detail"].startswith(field)
    cli_fields = set(expected[0])
    assert {"hour", "host", "path", "method", "requests", "status_2xx", "p50_ms", "p99_ms"} <= cli_fields


async def test_top_paths_from_fresh_snapshot_else_aggregates(env: Any) -> None:
    _seed(env)
    app = create_app(env)
    truth = queries.top_paths(env.DB, 24, 5)
    async with client_for(app) as c:
        before = (await c.get("/v1/paths/top", params={"hours": 24, "limit": 5})).json()
        snapshots.refresh(env)
        fresh = (await c.get("/v1/paths/top", params={"hours": 24, "limit": 5})).json()
        other_window = (await c.get("/v1/paths/top", params={"hours": 6, "limit": 5})).json()
        too_many = (await c.get("/v1/paths/top", params={"hours": 24, "limit": 500})).json()
    assert before["source"] == "aggregates" and before["rows"] == truth
    assert fresh["source"] == "snapshot"
    assert [(r["path"], r["method"], r["requests"]) for r in fresh["rows"]] == [
        (r["path"], r["method"], r["requests"]) for r in truth
    ]
    assert other_window["source"] == "aggregates" and other_window["hours"] == 6
    assert too_many["source"] == "snapshot"  # the snapshot holds every path there is (fewer than top_n)
    # A newer version generated an hour ago (older than snapshot_max_age) is not served.
    snapshots.refresh(env, now_s=clock.now_s() - 3600)
    async with client_for(app) as c:
        stale = (await c.get("/v1/paths/top")).json()
    assert stale["source"] == "aggregates"


async def test_top_paths_without_kv_uses_aggregates(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    _seed(env, 40)
    env.KV = None
    async with client_for(create_app(env)) as c:
        r = (await c.get("/v1/paths/top")).json()
    assert r["source"] == "aggregates" and sum(x["requests"] for x in r["rows"]) > 0


async def test_stats_jobs_archive_objects(env: Any) -> None:
    _seed(env, 50)
    now = clock.now_s()
    with env.DB.transaction() as conn:
        conn.execute(
            job_runs.insert(),
            [
                {"job": "archive", "scheduled_for": now - 7200, "attempt": 1, "status": "succeeded", "holder": "w",
                 "started_at": now - 7200, "finished_at": now - 7100, "result": orjson.dumps({"objects": 2}).decode(),
                 "error": None},
                {"job": "clean", "scheduled_for": now - 3600, "attempt": 1, "status": "failed", "holder": "w",
                 "started_at": now - 3600, "finished_at": now - 3500, "result": None, "error": "boom"},
            ],
        )  # fmt: skip
        conn.execute(
            archive_objects.insert(),
            [
                {"key": f"events/{h}.ndjson.gz", "hour": h, "status": "verified", "row_count": 10 + i,
                 "size_bytes": 999, "min_seq": 1, "max_seq": 9, "created_at": now}
                for i, h in enumerate(1_700_000_000 // 3600 * 3600 + k * 3600 for k in range(5))
            ],
        )  # fmt: skip
    async with client_for(create_app(env)) as c:
        stats = (await c.get("/v1/stats")).json()
        jobs = (await c.get("/v1/jobs")).json()["rows"]
        failed = (await c.get("/v1/jobs", params={"status": "failed"})).json()["rows"]
        objs = (await c.get("/v1/archive/objects")).json()
        page = (await c.get("/v1/archive/objects", params={"limit": 2})).json()
        page2 = (await c.get("/v1/archive/objects", params={"limit": 2, "cursor": page["next"]})).json()
        h0 = 1_700_000_000 // 3600 * 3600
        ranged = (await c.get("/v1/archive/objects", params={"from": h0 + 3600, "to": h0 + 3 * 3600})).json()
    assert stats["hot"]["events"] == 50 and stats["total"]["events"] == 50 and stats["cold"]["events"] == 0
    assert stats["queue"]["pending"] == 0
    assert [j["job"] for j in jobs] == ["clean", "archive"]
    assert jobs[1]["result"] == {"objects": 2} and jobs[1]["finished_at"].endswith("Z")
    assert [j["error"] for j in failed] == ["boom"]
    assert [o["row_count"] for o in objs["rows"]] == [10, 11, 12, 13, 14] and objs["next"] is None
    assert {"key", "row_count", "size_bytes", "status"} <= set(objs["rows"][0])
    assert [o["row_count"] for o in page["rows"] + page2["rows"]] == [10, 11, 12, 13]
    assert [o["row_count"] for o in ranged["rows"]] == [11, 12]


async def test_health_ready_and_metrics(env: Any) -> None:
    app = create_app(env)
    async with client_for(app) as c:
        health = await c.get("/health")
        no_worker = await c.get("/ready")
        _heartbeat(env)
        ready = await c.get("/ready")
        await c.post("/v1/events", json=[event(0), event(1, status=1)])
        metrics = (await c.get("/metrics")).text
    assert health.json() == {"status": "ok"}
    assert no_worker.status_code == 503
    assert no_worker.json()["error"] == "not_ready" and no_worker.json()["failing"] == ["worker"]
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"db", "queue", "kv", "archive", "worker"}
    assert "edgepipe_events_accepted_total 1.0" in metrics
    assert "edgepipe_events_rejected_total 1.0" in metrics
    assert "edgepipe_queue_depth 1.0" in metrics
    assert "edgepipe_dlq_depth 0.0" in metrics
    assert "edgepipe_consumer_lag_seconds" in metrics
    assert "edgepipe_batch_latency_seconds_bucket" in metrics


async def test_ready_fails_when_archive_store_is_down(make_env: Any, sqlite_url: str, tmp_path: Path) -> None:
    env = make_env(sqlite_url)
    _heartbeat(env)
    app = create_app(env)
    async with client_for(app) as c:
        assert (await c.get("/ready")).status_code == 200
        root = tmp_path / "archive"
        shutil.rmtree(root)
        root.write_text("not a directory any more")
        down = await c.get("/ready")
    body = down.json()
    assert down.status_code == 503
    assert body["failing"] == ["archive"] and body["detail"].startswith("archive:")
    assert body["checks"]["db"]["ok"] and not body["checks"]["archive"]["ok"]


async def test_ready_stale_heartbeat_and_unconfigured_bindings(make_env: Any, sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    _heartbeat(env, age_s=600)
    env.KV = None
    env.ARCHIVE = None
    async with client_for(create_app(env)) as c:
        r = await c.get("/ready")
    assert r.status_code == 503 and r.json()["failing"] == ["worker"]
    assert r.json()["checks"]["kv"] == {"ok": True, "detail": "not configured", "ms": r.json()["checks"]["kv"]["ms"]}
    assert "600 s ago" in r.json()["detail"]


async def test_metrics_job_runs_and_batch_latency(make_env: Any, sqlite_url: str) -> None:
    from consumers.traffic import TrafficConsumer
    from pipeline.worker import Worker

    env = make_env(sqlite_url)
    now = clock.now_s()
    with env.DB.transaction() as conn:
        conn.execute(job_runs.insert().values(job="monitor", scheduled_for=now, attempt=1, status="succeeded",
                                              holder="w", started_at=now))  # fmt: skip
    app = create_app(env)
    env.QUEUE.send_batch([event(i) for i in range(5)])
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    worker.on_batch.append(app.state.metrics.observe_batch)
    worker.run(until_empty=True)
    async with client_for(app) as c:
        text = (await c.get("/metrics")).text
    assert 'edgepipe_job_runs{job="monitor",status="succeeded"} 1.0' in text
    assert "edgepipe_batch_latency_seconds_count 1.0" in text
    assert 'edgepipe_batches_total{outcome="ok"} 1.0' in text


async def test_openapi_documents_every_route_and_the_error_shape(env: Any) -> None:
    async with client_for(create_app(env)) as c:
        doc = (await c.get("/openapi.json")).json()
    paths = doc["paths"]
    for route in ("/v1/events", "/v1/paths/top", "/v1/paths/hourly", "/v1/stats", "/v1/jobs",
                  "/v1/archive/objects", "/health", "/ready", "/metrics"):  # fmt: skip
        assert route in paths
    post = paths["/v1/events"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/x-ndjson"}
    assert {"202", "400", "401", "413", "415", "503"} <= set(post["responses"])
    assert all("422" not in op["responses"] for item in paths.values() for op in item.values())
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    bearer = [{"HTTPBearer": []}]
    secured = {route for route, item in paths.items() if all(op.get("security") == bearer for op in item.values())}
    assert secured == set(paths) - {"/health", "/ready"}


def test_tokens_cli_create_list_revoke(tmp_path: Path) -> None:
    cfg_file = tmp_path / "edgepipe.toml"
    cfg_file.write_text(f'[bindings]\ndb = "sqlite:///{tmp_path}/e.db"\narchive = "file://{tmp_path}/archive"\n')
    runner = CliRunner()
    args = ["--config", str(cfg_file)]
    assert runner.invoke(main, [*args, "init"]).exit_code == 0
    created = runner.invoke(main, [*args, "tokens", "create", "gw", "--scope", "read", "--json"])
    assert created.exit_code == 0, created.output
    token = orjson.loads(created.stdout)["token"]
    listed = runner.invoke(main, [*args, "tokens", "list", "--json"])
    rows = orjson.loads(listed.stdout)
    assert [(r["name"], r["scope"], r["active"]) for r in rows] == [("gw", "read", True)]
    assert token not in listed.stdout
    env = open_env(Config().replace(bindings={"db": f"sqlite:///{tmp_path}/e.db"}))
    with env.DB.read() as conn:
        stored = conn.execute(sa.text("SELECT token_hash FROM api_tokens")).scalar_one()
    env.close()
    assert token not in stored and len(stored) == 64
    assert runner.invoke(main, [*args, "tokens", "revoke", str(rows[0]["id"])]).exit_code == 0
    assert orjson.loads(runner.invoke(main, [*args, "tokens", "list", "--json"]).stdout)[0]["active"] is False
    missing = runner.invoke(main, [*args, "tokens", "revoke", "999"])
    assert missing.exit_code == 5 and "999" in missing.stderr


def test_serve_refuses_public_address_without_tokens(tmp_path: Path) -> None:
    cfg_file = tmp_path / "edgepipe.toml"
    cfg_file.write_text(f'[bindings]\ndb = "sqlite:///{tmp_path}/e.db"\narchive = "file://{tmp_path}/archive"\n')
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(cfg_file), "init"]).exit_code == 0
    r = runner.invoke(main, ["--config", str(cfg_file), "serve", "--host", "0.0.0.0", "--port", "1"])
    assert r.exit_code == 2
    assert "refusing to serve on non-loopback address 0.0.0.0" in r.stderr and "tokens create" in r.stderr
    assert r.stderr.count("\n") == 1
