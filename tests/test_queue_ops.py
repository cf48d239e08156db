"""What operators and the HTTP layer ask of a queue works on every queue backend, through
the Queue interface only: `edgepipe queue stats` and `queue dlq list|redrive|purge`, HTTP
backpressure, and the queue gauges of `/metrics`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pipeline.bindings.queue import REASON_INVALID, REASON_TOO_LATE
from pipeline.env import Env
from pipeline.http.app import create_app
from tests.conftest import MakeEnv, run_cli
from tests.http_support import client_for, consume_all, event

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cli_json(env: Env, *args: str) -> Any:
    result = run_cli(env, *args, "--json", environ={"EDGEPIPE_BINDINGS__QUEUE": env.config.bindings.queue})
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def dead_letter(env: Env, reasons: list[str]) -> None:
    env.QUEUE.send_batch([{"n": i} for i in range(len(reasons))])
    batch = env.QUEUE.receive(len(reasons), 0)
    assert len(batch) == len(reasons)
    for m in batch:
        m.dead_letter(reasons[m.body["n"]], f"n: bad {m.body['n']}")
    env.QUEUE.settle(batch)


def test_queue_stats_and_dlq_commands(qenv: Env) -> None:
    dead_letter(qenv, [REASON_INVALID, REASON_INVALID, REASON_TOO_LATE])
    qenv.QUEUE.send_batch(["waiting", "also waiting"])
    stats = cli_json(qenv, "queue", "stats")
    assert {k: stats[k] for k in ("pending", "in_flight", "dlq")} == {"pending": 2, "in_flight": 0, "dlq": 3}
    assert (stats["dlq_invalid"], stats["dlq_too_late"]) == (2, 1)

    listed = cli_json(qenv, "queue", "dlq", "list", "--reason", "invalid")
    assert sorted(d["error"] for d in listed) == ["n: bad 0", "n: bad 1"]
    assert {d["reason"] for d in listed} == {"invalid"}

    assert cli_json(qenv, "queue", "dlq", "redrive", "--reason", "invalid") == {"redriven": 2}
    assert qenv.QUEUE.rejected_totals()[REASON_INVALID] == 0  # processed again: no longer a failure
    assert cli_json(qenv, "queue", "dlq", "purge") == {"purged": 1}
    assert qenv.QUEUE.rejected_totals()[REASON_TOO_LATE] == 1  # a purge keeps the count
    stats = cli_json(qenv, "queue", "stats")
    assert {k: stats[k] for k in ("pending", "in_flight", "dlq")} == {"pending": 4, "in_flight": 0, "dlq": 0}
    assert sorted(str(m.body) for m in qenv.QUEUE.receive(10, 0)) == sorted(
        ["{'n': 0}", "{'n': 1}", "waiting", "also waiting"]
    )


async def test_backpressure_and_metrics_gauges(make_qenv: MakeEnv) -> None:
    env = make_qenv(http={"max_queue_depth": 2, "depth_check_interval": 0})
    dead_letter(env, [REASON_INVALID])
    app = create_app(env)
    async with client_for(app) as c:
        accepted = [
            (await c.post("/v1/events", json=[event(10 * k + i) for i in range(3)])).status_code for k in range(3)
        ]
        refused = await c.post("/v1/events", json=[event(99)])
        metrics = (await c.get("/metrics")).text
        consume_all(env)
        again = await c.post("/v1/events", json=[event(100)])
        drained = (await c.get("/metrics")).text
    assert accepted == [202, 202, 202]
    assert refused.status_code == 503 and refused.json()["error"] == "queue_full"
    assert again.status_code == 202
    assert "edgepipe_queue_depth 3.0" in metrics and "edgepipe_dlq_depth 1.0" in metrics
    assert "edgepipe_queue_depth 1.0" in drained and "edgepipe_dlq_depth 1.0" in drained
