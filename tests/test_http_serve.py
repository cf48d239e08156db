"""End to end over a real socket: `edgepipe serve` in a subprocess on a free loopback port,
10k events posted with duplicates (JSON, NDJSON and gzip bodies), `edgepipe consume
--until-empty` in another subprocess, and the exact aggregates read back through
`/v1/paths/hourly` (paged)."""

from __future__ import annotations

import gzip
import random
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pipeline import clock
from tests.http_support import edgepipe_cmd, free_port, serving

pytestmark = pytest.mark.slow
DEADLINE_S = 60


def _edgepipe(cfg: Path, *args: str) -> list[str]:
    return edgepipe_cmd(cfg, *args)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cfg = tmp_path / "edgepipe.toml"
    cfg.write_text(
        f'[bindings]\ndb = "sqlite:///{tmp_path}/e.db"\narchive = "file://{tmp_path}/archive"\n'
        "[consumer]\nmax_batch_size = 1000\nmax_batch_timeout = 0\n"
    )
    subprocess.run(_edgepipe(cfg, "init"), check=True, capture_output=True, timeout=DEADLINE_S)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(cfg, base, "--host", "127.0.0.1", "--port", str(port)):
        yield base, cfg


def _events(n_unique: int, n_dupes: int, seed: int = 11) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    now = clock.now_ms()
    unique = [
        {
            "id": f"evt-{i}",
            "ts": now - rng.randint(60_000, 5 * 3_600_000),
            "method": rng.choice(["GET", "GET", "POST"]),
            "path": f"/shop/item-{rng.randint(0, 40)}",
            "status": rng.choice([200, 200, 201, 404, 500]),
            "response_time_ms": round(rng.uniform(0.5, 900), 2),
            "host": rng.choice(["a.example", "b.example"]),
            "bytes": rng.randint(0, 9000),
        }
        for i in range(n_unique)
    ]
    sent = unique + [dict(rng.choice(unique)) for _ in range(n_dupes)]
    rng.shuffle(sent)
    return unique, sent


def _post_all(base: str, sent: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        for k, i in enumerate(range(0, len(sent), 500)):
            chunk = sent[i : i + 500]
            if k % 3 == 0:
                r = client.post("/v1/events", json=chunk)
            elif k % 3 == 1:
                body = b"\n".join(orjson.dumps(e) for e in chunk)
                r = client.post("/v1/events", content=body, headers={"content-type": "application/x-ndjson"})
            else:
                headers = {"content-type": "application/json", "content-encoding": "gzip"}
                r = client.post("/v1/events", content=gzip.compress(orjson.dumps(chunk)), headers=headers)
            assert r.status_code == 202, r.text
            assert r.json() == {"accepted": len(chunk), "rejected": []}


def _read_hourly(base: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(base_url=base, timeout=30) as client:
        while True:
            params: dict[str, Any] = {"limit": 100} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/paths/hourly", params=params).json()
            rows.extend(page["rows"])
            cursor = page["next"]
            if cursor is None:
                return rows


def test_serve_post_consume_read_back_exactly(server: tuple[str, Path]) -> None:
    base, cfg = server
    unique, sent = _events(8000, 2000)
    assert len(sent) == 10_000
    _post_all(base, sent)
    consumed = subprocess.run(_edgepipe(cfg, "consume", "--until-empty"), capture_output=True, timeout=120)
    assert consumed.returncode == 0, consumed.stderr.decode()

    truth: Counter[tuple[Any, ...]] = Counter()
    for e in unique:
        key = (clock.iso(clock.hour_of_ms(e["ts"])), e["host"], e["path"], e["method"])
        truth[(*key, "requests")] += 1
        truth[(*key, f"status_{e['status'] // 100}xx")] += 1
        truth[(*key, "bytes_sum")] += e["bytes"]
    got: Counter[tuple[Any, ...]] = Counter()
    for r in _read_hourly(base):
        key = (r["hour"], r["host"], r["path"], r["method"])
        for field in ("requests", "status_2xx", "status_4xx", "status_5xx", "bytes_sum"):
            if r[field]:
                got[(*key, field)] += r[field]
    assert got == truth
    assert sum(v for k, v in got.items() if k[-1] == "requests") == 8000
    stats = httpx.get(f"{base}/v1/stats", timeout=10).json()
    assert stats["queue"] == {"pending": 0, "in_flight": 0, "dlq": 0}
    assert stats["hot"]["events"] == 8000
