"""`edgepipe bench http`: the HTTP ingest path and the traffic collector's cost.

Each target runs as its own uvicorn subprocess on a loopback port, all with the same
uvicorn settings (default event loop and HTTP implementation, log level warning, no access
log; edgepipe's target is started as `edgepipe serve` starts it, `run_server`) and each
with a database of its own; this process is the load generator (keep-alive
connections over raw asyncio streams, so the generator is cheap next to the servers). Two
pairs are compared, each measured in the same run:

* `POST /v1/events` with 100 events per request against edgepipe (validate, enqueue into
  the SQLite queue as one array message, answer after the commit) vs a reference FastAPI endpoint that reads,
  validates the same way and discards;
* a small FastAPI app with the `TrafficCollector` (local queue binding) vs the same app
  without it.

The machine is shared and its load drifts, so each round loads the two targets of a pair
in alternating slices of `SLICE_S` seconds (A B B A …, every request of a slice answered
before the next starts), and the median of the per-round ratios is reported. No consumer
drains the queue during a run, so edgepipe's `max_queue_depth` is raised above what a run
can enqueue; the depth check itself still runs as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline import clock, sample
from pipeline.bench.common import Progress, quiet

EVENTS_PER_REQUEST = 100
BODIES = 32
START_DEADLINE_S = 30
SLICE_S = 1.0
QUEUE_LIMIT = 100_000_000
PAIRS = (("reference", "edgepipe"), ("plain", "collector"))


# -- targets (run in the server subprocess) --------------------------------------------


def _env(db_url: str, tmp: str) -> Any:
    from pipeline.config import Config
    from pipeline.env import open_env

    cfg = Config().replace(
        bindings={"db": db_url, "archive": f"file://{tmp}/archive"}, http={"max_queue_depth": QUEUE_LIMIT}
    )
    return open_env(cfg)


def _reference_app() -> Any:
    """Reads the body, validates each event like edgepipe does, discards them."""
    from pipeline.events import parse_event
    from pipeline.paths import PathNormalizer

    app = FastAPI()
    normalizer = PathNormalizer()

    @app.post("/v1/events")
    async def events(request: Request) -> JSONResponse:
        values = orjson.loads(await request.body())
        now = clock.now_ms()
        for v in values:
            parse_event(v, normalizer, now, fallback_id="-")
        return JSONResponse({"accepted": len(values), "rejected": []}, status_code=202)

    return app


def _small_app(collector_queue: Any = None) -> Any:
    app = FastAPI()

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    if collector_queue is not None:
        from pipeline.http import TrafficCollector

        app.add_middleware(TrafficCollector, queue=collector_queue)
    return app


def serve_target(kind: str, port: int, db_url: str, tmp: str) -> None:
    import uvicorn

    if kind == "edgepipe":  # as `edgepipe serve` runs it
        from pipeline.http.app import create_app, run_server

        return run_server(create_app(_env(db_url, tmp)), "127.0.0.1", port)
    if kind == "reference":
        app = _reference_app()
    elif kind == "plain":
        app = _small_app()
    elif kind == "collector":
        app = _small_app(_env(db_url, tmp).QUEUE)
    else:
        raise SystemExit(f"unknown target {kind}")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the load generator ----------------------------------------------------------------


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    if body:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _connection(port: int, requests: list[bytes], until: float, counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while clock.monotonic() < until:
            writer.write(requests[i % len(requests)])
            i += 1
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            counts["ok" if status < 300 else "failed"] += 1
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], seconds: float, concurrency: int) -> dict[str, float]:
    counts = {"ok": 0, "failed": 0}
    started = clock.monotonic()
    until = started + seconds
    await asyncio.gather(*(_connection(port, requests, until, counts) for _ in range(concurrency)))
    elapsed = clock.monotonic() - started
    return {"requests_per_s": counts["ok"] / elapsed, "failed": counts["failed"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(kind: str, db_url: str, tmp: str) -> Iterator[int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "pipeline.bench.http", kind, str(port), db_url, tmp]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = clock.monotonic() + START_DEADLINE_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr is not None else ""
                    raise RuntimeError(f"{kind} server exited: {err[-500:]}") from None
                if clock.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start") from None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _measure(port: int, kind: str, requests: list[bytes], seconds: float, concurrency: int) -> float:
    result = asyncio.run(_load(port, requests, seconds, concurrency))
    if result["failed"]:
        raise RuntimeError(f"{kind}: {int(result['failed'])} requests failed during the benchmark")
    return result["requests_per_s"]


def _pair(
    ports: dict[str, int], plan: dict[str, list[bytes]], pair: tuple[str, str], seconds: float, concurrency: int
) -> dict[str, float]:
    """Requests/s of both targets of `pair` over `seconds` each, loaded in alternating slices."""
    slices = max(1, round(seconds / SLICE_S))
    rates: dict[str, list[float]] = {kind: [] for kind in pair}
    for i in range(slices):
        for kind in pair if i % 2 == 0 else pair[::-1]:
            rates[kind].append(_measure(ports[kind], kind, plan[kind], seconds / slices, concurrency))
    return {kind: statistics.fmean(r) for kind, r in rates.items()}


def run(seconds: float = 3.0, concurrency: int = 16, rounds: int = 5, progress: Progress = quiet) -> dict[str, Any]:
    """Requests/s and events/s of each target; ratios edgepipe/reference and collector/plain
    (the median of the per-round ratios; the rates reported are per-target medians).

    All four servers start first and idle between their turns."""
    from pipeline import migrate
    from pipeline.bindings.db import Database

    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-http-") as tmp, contextlib.ExitStack() as stack:
        events = list(sample.events(EVENTS_PER_REQUEST * BODIES, days=0.05, n_paths=200))
        posts = [
            _request("POST", "/v1/events", orjson.dumps(events[i : i + EVENTS_PER_REQUEST]))
            for i in range(0, len(events), EVENTS_PER_REQUEST)
        ]
        gets = [_request("GET", f"/users/{i}") for i in range(BODIES)]
        plan = {"reference": posts, "edgepipe": posts, "plain": gets, "collector": gets}
        ports = {}
        for kind in plan:
            home = Path(tmp) / kind
            home.mkdir()
            db_url = f"sqlite:///{home / 'edgepipe.db'}"
            db = Database(db_url)
            migrate.upgrade(db)
            db.dispose()
            ports[kind] = stack.enter_context(_server(kind, db_url, str(home)))
        for kind, requests in plan.items():  # warm-up
            _measure(ports[kind], kind, requests, min(1.0, seconds / 3), concurrency)
        runs: dict[str, list[float]] = {kind: [] for kind in plan}
        for r in range(rounds):
            for pair in PAIRS:
                for kind, rate in _pair(ports, plan, pair, seconds, concurrency).items():
                    runs[kind].append(rate)
            rates = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items())
            progress(f"round {r + 1}/{rounds}: {rates} requests/s")
    med = {kind: statistics.median(v) for kind, v in runs.items()}
    ingest = statistics.median(e / r for e, r in zip(runs["edgepipe"], runs["reference"], strict=True))
    collector = statistics.median(c / p for c, p in zip(runs["collector"], runs["plain"], strict=True))
    return {
        "events_per_request": EVENTS_PER_REQUEST,
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "edgepipe_requests_per_s": round(med["edgepipe"], 1),
        "edgepipe_events_per_s": round(med["edgepipe"] * EVENTS_PER_REQUEST),
        "reference_requests_per_s": round(med["reference"], 1),
        "reference_events_per_s": round(med["reference"] * EVENTS_PER_REQUEST),
        "ingest_ratio": round(ingest, 3),
        "ingest_ratios": [round(e / r, 3) for e, r in zip(runs["edgepipe"], runs["reference"], strict=True)],
        "plain_requests_per_s": round(med["plain"], 1),
        "collector_requests_per_s": round(med["collector"], 1),
        "collector_ratio": round(collector, 3),
        "collector_ratios": [round(c / p, 3) for c, p in zip(runs["collector"], runs["plain"], strict=True)],
    }


if __name__ == "__main__":
    serve_target(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
