"""`GET /v1/overview` and `GET /v1/pipeline` (no browser), on every DB backend.

The overview is checked against the independent oracle (tests/traffic_truth.py): totals,
rates, bytes, distinct paths and hosts, one series point per hour with traffic, the top
paths and their sparklines, the host and path filters, and the percentiles (the merged
histogram of the events, and inside the bucket of the exact nearest-rank percentile).
A range reaching days whose hourly rows were pruned is answered from the daily rows, in
day buckets. Bad parameters are 400 in the one error shape. The pipeline document is what
`edgepipe monitor --json`, `status --json` and `jobs list --json` print."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import pytest
from freezegun import freeze_time

from pipeline import clock
from pipeline.cli.report import pipeline_document
from pipeline.heartbeat import Heartbeat
from pipeline.histogram import percentiles
from pipeline.http.app import create_app
from scheduler.runner import run_by_hand
from tests.archive_support import consume, event, ms, run_job
from tests.conftest import run_cli
from tests.http_support import client_for, consume_all
from tests.traffic_truth import BOUNDS, BUCKETS, Truth, bucket_of, make_events

pytestmark = pytest.mark.anyio
NOW = "2026-11-20T15:30:00Z"
HOUR_S, DAY_S = 3600, 86_400
QS = (0.5, 0.95, 0.99)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _load(env: Any, n: int = 3000, seed: int = 5) -> list[Truth]:
    """`n` events of the 3 days before NOW, through the queue and the consumer, and one
    event of a host seen only 2 days before NOW."""
    with freeze_time(NOW):
        made = make_events(seed, n, clock.now_ms(), 3 * DAY_S * 1000)
        for i in range(0, n, 500):
            env.QUEUE.send_batch([body for body, _ in made[i : i + 500]])
        env.QUEUE.send(event(0, clock.now_ms() - 2 * DAY_S * 1000, host="old.example.com"))
        consume_all(env)
    return [t for _, t in made]


def _expected(events: Iterable[Truth]) -> dict[str, Any]:
    """Totals of the events, computed here: counts, rates, bytes, percentiles of their
    histogram (the estimator's input, built from the raw response times)."""
    events = list(events)
    n = len(events)
    classes = Counter(f"status_{e.status // 100}xx" for e in events)
    buckets = Counter(bucket_of(e.rt) for e in events)
    rts = [e.rt for e in events]
    pcts = percentiles([buckets[b] for b in BUCKETS], QS, min(rts), max(rts)) if n else [None] * 3
    rate = (lambda k: round(k / n, 6)) if n else (lambda k: 0.0)
    out = {
        "requests": n,
        **{f"status_{c}xx": classes[f"status_{c}xx"] for c in range(1, 6)},
        "rate_4xx": rate(classes["status_4xx"]),
        "rate_5xx": rate(classes["status_5xx"]),
        "error_rate": rate(classes["status_4xx"] + classes["status_5xx"]),
        "bytes": sum(e.nbytes or 0 for e in events),
        "p50_ms": pcts[0],
        "p95_ms": pcts[1],
        "p99_ms": pcts[2],
    }
    return out


def _first_hour(now: str, hours: int = 24) -> int:
    return int(clock.parse_time(now)) // HOUR_S * HOUR_S - (hours - 1) * HOUR_S


def _bucket_bounds(rt: float, hi: float) -> tuple[float, float]:
    i = BUCKETS.index(bucket_of(rt))
    return (0.0 if i == 0 else float(BOUNDS[i - 1])), (float(BOUNDS[i]) if i < len(BOUNDS) else hi)


async def test_the_last_24_hours_by_default_against_the_oracle(env: Any) -> None:
    truths = _load(env)
    first = _first_hour(NOW)
    window = [t for t in truths if t.hour >= first]
    with freeze_time(NOW):
        async with client_for(create_app(env)) as c:
            r = await c.get("/v1/overview")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["from"], doc["to"], doc["source"], doc["bucket_s"]) == (
        clock.iso(first), clock.iso(first + 24 * HOUR_S), "hourly", HOUR_S,
    )  # fmt: skip
    assert doc["hosts"] == sorted({t.host for t in window}) and "old.example.com" not in doc["hosts"]
    assert doc["totals"] == _expected(window) | {"distinct_paths": len({t.path for t in window})}

    # The percentile estimates lie in the bucket of the exact (nearest-rank) percentile.
    rts = sorted(t.rt for t in window)
    for q, key in zip(QS, ("p50_ms", "p95_ms", "p99_ms"), strict=True):
        exact = rts[math.ceil(q * len(rts)) - 1]
        lo, hi = _bucket_bounds(exact, rts[-1])
        assert max(lo, rts[0]) <= doc["totals"][key] <= hi, (key, exact)

    # One point per hour with traffic, each the sum of its hour.
    by_hour: dict[int, list[Truth]] = defaultdict(list)
    for t in window:
        by_hour[t.hour].append(t)
    assert [p["t"] for p in doc["series"]] == [clock.iso(h) for h in sorted(by_hour)]
    for point in doc["series"]:
        want = _expected(by_hour[int(clock.parse_time(point["t"]))])
        assert {k: point[k] for k in want} == want, point["t"]

    # The top 20 paths, busiest first, each with its requests in every hour of the range.
    per_path = Counter(t.path for t in window)
    top = sorted(per_path, key=lambda p: (-per_path[p], p))[:20]
    assert [p["path"] for p in doc["paths"]] == top
    for row in doc["paths"]:
        mine = [t for t in window if t.path == row["path"]]
        want = _expected(mine)
        assert {k: row[k] for k in ("requests", "rate_4xx", "rate_5xx", "error_rate", "bytes", "p95_ms")} == {
            k: want[k] for k in ("requests", "rate_4xx", "rate_5xx", "error_rate", "bytes", "p95_ms")
        }
        hours = Counter(t.hour for t in mine)
        assert row["spark"] == [hours[first + i * HOUR_S] for i in range(24)]


async def test_ranges_and_filters(env: Any) -> None:
    truths = _load(env)
    start = clock.iso(clock.parse_time(NOW) - 3 * DAY_S)
    host = "shop.example.com"
    path = Counter(t.path for t in truths).most_common(1)[0][0]
    with freeze_time(NOW):
        async with client_for(create_app(env)) as c:
            whole = (await c.get("/v1/overview", params={"from": start, "to": NOW, "limit": 5})).json()
            epoch = (await c.get("/v1/overview", params={"from": str(clock.parse_time(start)), "limit": 5})).json()
            one_host = (await c.get("/v1/overview", params={"from": start, "host": host})).json()
            no_host = (await c.get("/v1/overview", params={"from": start, "host": ""})).json()
            one_path = (await c.get("/v1/overview", params={"from": start, "path": path})).json()
            quiet_host = (await c.get("/v1/overview", params={"host": "old.example.com"})).json()
    assert whole["totals"]["requests"] == len(truths) + 1 and len(whole["paths"]) == 5  # + old.example.com
    assert whole["to"] == clock.iso(int(clock.parse_time(NOW)) // HOUR_S * HOUR_S + HOUR_S)  # whole hours
    assert {k: epoch[k] for k in ("totals", "series", "paths")} == {k: whole[k] for k in ("totals", "series", "paths")}
    assert "old.example.com" in whole["hosts"]
    hosted = [t for t in truths if t.host == host]
    assert one_host["host"] == host and one_host["hosts"] == whole["hosts"]
    assert {k: one_host["totals"][k] for k in ("requests", "bytes", "p95_ms")} == {
        k: _expected(hosted)[k] for k in ("requests", "bytes", "p95_ms")
    }
    assert no_host["totals"]["requests"] == sum(t.host == "" for t in truths) > 0
    mine = [t for t in truths if t.path == path]
    assert one_path["totals"] == _expected(mine) | {"distinct_paths": 1}
    assert [p["path"] for p in one_path["paths"]] == [path]
    assert len(one_path["series"]) == len({t.hour for t in mine})
    # a host seen, but not in the last 24 hours: zeros, not an error
    assert quiet_host["totals"]["requests"] == 0 and quiet_host["series"] == [] and quiet_host["paths"] == []
    assert quiet_host["totals"]["p50_ms"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-11-20T10:00:00Z", "to": "2026-11-20T09:00:00Z"}, "to"),
        ({"from": "2025-01-01", "to": "2026-11-20"}, "from"),
        ({"host": "nowhere.example"}, "host"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
    ],
)
async def test_bad_parameters_are_400_naming_the_field(env: Any, params: dict[str, str], field: str) -> None:
    _load(env, n=50)
    with freeze_time(NOW):
        async with client_for(create_app(env)) as c:
            r = await c.get("/v1/overview", params=params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "validation_error" and body["detail"].startswith(f"{field}:"), body


def _day_traffic(start: str, days: int) -> list[dict[str, Any]]:
    base = ms(start)
    out = []
    for h in range(days * 24):
        for k in range(2):
            i = h * 2 + k
            out.append(event(i, base + h * HOUR_S * 1000 + k * 600_000, path=f"/d{i % 3}",
                             status=(200, 404, 503)[i % 3], response_time_ms=(3.0, 40.0, 700.0)[i % 3]))  # fmt: skip
    return out


async def test_a_range_reaching_pruned_days_is_answered_in_days(make_env: Any, db_url: str) -> None:
    env = make_env(db_url, retention={"hourly_days": 5})
    old = _day_traffic("2026-11-10T00:00:00Z", 3)
    with freeze_time("2026-11-13T00:10:00Z"):
        assert consume(env, old)["inserted"] == len(old)
    with freeze_time("2026-11-17T02:00:00Z"):
        run_job(env, "archive", "2026-11-17T02:00:00Z")
    with freeze_time("2026-11-17T03:00:00Z"):
        run_job(env, "clean", "2026-11-17T03:00:00Z")
    new = [event(20_000 + h, ms("2026-11-17T08:00:00Z") + h * HOUR_S * 1000, path="/new") for h in range(4)]
    with freeze_time("2026-11-17T12:30:00Z"):
        assert consume(env, new)["inserted"] == len(new)
    with freeze_time("2026-11-18T00:20:00Z"):
        assert run_job(env, "rollup", "2026-11-18T00:15:00Z")["hourly_pruned_before"] == "2026-11-13T00:00:00Z"

    with freeze_time("2026-11-18T12:00:00Z"):
        async with client_for(create_app(env)) as c:
            days = (await c.get("/v1/overview", params={"from": "2026-11-10T06:00:00Z"})).json()
            hours = (await c.get("/v1/overview", params={"from": "2026-11-15T00:00:00Z"})).json()
    assert (days["source"], days["bucket_s"], days["from"], days["to"]) == (
        "daily", DAY_S, "2026-11-10T00:00:00Z", "2026-11-19T00:00:00Z",
    )  # fmt: skip
    per_day = Counter(e["ts"] // 1000 // DAY_S * DAY_S for e in old + new)
    assert [(p["t"], p["requests"]) for p in days["series"]] == [(clock.iso(d), n) for d, n in sorted(per_day.items())]
    assert days["totals"]["requests"] == len(old) + len(new)
    assert days["totals"]["status_5xx"] == sum(e["status"] >= 500 for e in old + new)
    assert days["totals"]["distinct_paths"] == 4
    new_path = next(p for p in days["paths"] if p["path"] == "/new")
    assert len(new_path["spark"]) == 9 and new_path["spark"][7] == 4 and sum(new_path["spark"]) == 4
    assert (hours["source"], hours["bucket_s"]) == ("hourly", HOUR_S)
    assert [(p["t"], p["requests"]) for p in hours["series"]] == [
        (clock.iso(ms("2026-11-17T08:00:00Z") // 1000 + h * HOUR_S), 1) for h in range(4)
    ]


def _cli_json(env: Any, *args: str) -> Any:
    res = run_cli(env, *args, "--json")
    assert res.exit_code in (0, 1), res.output  # `status` exits 1 when no worker is healthy
    return json.loads(res.stdout)


async def test_pipeline_is_what_monitor_status_and_jobs_list_print(env: Any) -> None:
    _load(env, n=100)
    env.QUEUE.send_batch([{"id": "x", "path": "nope"}, {"id": "y"}])
    consume_all(env)
    with freeze_time(NOW):
        beat = Heartbeat(env.DB, "edge-9:1:aa")
        beat.batch_done()
        beat.beat(force=True)
        assert run_by_hand(env, "monitor", None).status == "succeeded"
    with freeze_time("2026-11-20T15:30:05Z"):
        async with client_for(create_app(env, pipeline_report=pipeline_document)) as c:
            r = await c.get("/v1/pipeline")
        monitor, status, jobs = (_cli_json(env, *cmd) for cmd in (["monitor"], ["status"], ["jobs", "list"]))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["monitor"] == monitor and doc["status"] == status and doc["jobs"] == jobs
    assert [w["holder"] for w in doc["status"]["workers"]] == ["edge-9:1:aa"] and doc["status"]["healthy"]
    assert {j["job"] for j in doc["jobs"]} >= {"archive", "clean", "monitor", "rollup"}
    assert next(j for j in doc["jobs"] if j["job"] == "monitor")["last_status"] == "succeeded"
    assert doc["dlq_by_reason"] == {"invalid": 2} and doc["rejected"]["invalid"] == 2
    assert doc["generated_at"] == "2026-11-20T15:30:05Z"


async def test_pipeline_without_its_report_is_503(env: Any) -> None:
    async with client_for(create_app(env)) as c:
        r = await c.get("/v1/pipeline")
    assert r.status_code == 503 and r.json()["error"] == "not_available"
