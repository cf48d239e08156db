"""Snapshots: content against a ground truth computed here from the raw events, atomic
publication under concurrent readers, versioned keys and pruning."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from typing import Any

import pytest
from freezegun import freeze_time

import snapshots
from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.cli.compose import consumer_worker
from pipeline.jobs import JOBS
from pipeline.schema import LATENCY_BUCKETS_MS
from pipeline.worker import Worker
from tests.conftest import run_cli

NOW = "2026-11-20T12:30:00Z"


def _events(now_s: float, n: int, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "id": f"e{i}",
                "ts": int((now_s - rng.uniform(0, 30 * 3600)) * 1000),  # 30 h: some outside a 24 h window
                "method": rng.choice(["GET", "GET", "POST"]),
                "path": f"/p{min(int(rng.expovariate(0.4)), 12)}",
                "status": rng.choice([200, 200, 200, 201, 304, 404, 429, 500, 503]),
                "response_time_ms": round(rng.lognormvariate(3.5, 1.2), 3),
                "host": rng.choice(["a.example", "b.example"]),
                "bytes": rng.randint(0, 5000),
            }
        )
    return out


def _consume(env: Any, events: list[dict[str, Any]]) -> None:
    env.QUEUE.send_batch(events)
    Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)


def _bucket_bounds(ms: float) -> tuple[float, float]:
    for i, upper in enumerate(LATENCY_BUCKETS_MS):
        if ms <= upper:
            return (0.0 if i == 0 else float(LATENCY_BUCKETS_MS[i - 1])), float(upper)
    return float(LATENCY_BUCKETS_MS[-1]), float("inf")


def _truth(events: list[dict[str, Any]], now_s: float, window_hours: int, top_n: int) -> list[dict[str, Any]]:
    first_hour = int(now_s) // 3600 * 3600 - (window_hours - 1) * 3600
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["ts"] // 1000 >= first_hour:
            groups[(e["path"], e["method"])].append(e)
    rows = []
    for (path, method), evs in groups.items():
        n = len(evs)
        e4 = sum(400 <= e["status"] < 500 for e in evs)
        e5 = sum(e["status"] >= 500 for e in evs)
        rts = sorted(e["response_time_ms"] for e in evs)
        rows.append(
            {
                "path": path,
                "method": method,
                "requests": n,
                "status_4xx": e4,
                "status_5xx": e5,
                "errors": e4 + e5,
                "error_rate": round((e4 + e5) / n, 6),
                "rt_avg_ms": round(sum(rts) / n, 3),
                "rt_min_ms": rts[0],
                "rt_max_ms": rts[-1],
                "bytes_sum": sum(e["bytes"] for e in evs),
                "_rts": rts,
            }
        )
    rows.sort(key=lambda r: (-r["requests"], r["path"], r["method"]))
    return rows[:top_n]


def test_snapshot_equals_ground_truth(env: Any) -> None:
    with freeze_time(NOW):
        now_s = clock.now_s()
        events = _events(now_s, 3000)
        _consume(env, events)
        result = snapshots.refresh(env)
        snap = snapshots.read_latest(env.KV)
    cfg = env.config.snapshots
    truth = _truth(events, now_s, cfg.window_hours, 8)
    assert result["version"] == 1 and result["latest"] is True
    assert snap is not None
    assert snap["version"] == 1
    assert snap["generated_at"] == "2026-11-20T12:30:00Z"
    assert snap["window_hours"] == 24
    assert snap["window_start"] == "2026-11-19T13:00:00Z"
    got = snap["paths"][:8]
    first_hour = clock.parse_time("2026-11-19T13:00:00Z")
    assert len(snap["paths"]) == len({(e["path"], e["method"]) for e in events if e["ts"] // 1000 >= first_hour})
    for want, have in zip(truth, got, strict=True):
        rts = want.pop("_rts")
        for key, value in want.items():
            if isinstance(value, float):
                assert have[key] == pytest.approx(value, abs=1e-3), key
            else:
                assert have[key] == value, key
        for q in (50, 95, 99):
            exact = rts[max(0, -(-q * len(rts) // 100) - 1)]
            lo, hi = _bucket_bounds(exact)
            assert lo - 1e-9 <= have[f"p{q}_ms"] <= min(hi, want["rt_max_ms"]) + 1e-9, (q, exact, have)
    assert env.KV.get(snapshots.version_key(1), type="json") == snap


def test_window_and_top_n_from_config(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, snapshots={"top_n": 3, "window_hours": 2})
    with freeze_time(NOW):
        now_s = clock.now_s()
        events = _events(now_s, 800, seed=9)
        _consume(env, events)
        snapshots.refresh(env)
        snap = snapshots.read_latest(env.KV)
    truth = _truth(events, now_s, 2, 3)
    assert snap is not None and snap["window_hours"] == 2
    assert [(r["path"], r["method"], r["requests"]) for r in snap["paths"]] == [
        (t["path"], t["method"], t["requests"]) for t in truth
    ]


def test_versions_are_zero_padded_and_listed_in_order(env: Any) -> None:
    assert snapshots.read_latest(env.KV) is None
    for _ in range(12):
        snapshots.refresh(env)
    versions = snapshots.list_versions(env.KV)
    assert [v["key"] for v in versions] == [f"snapshot:v{n:06d}" for n in range(1, 13)]
    latest = snapshots.read_latest(env.KV)
    assert latest is not None and latest["version"] == 12


def test_prune_keeps_exactly_the_newest_five(env: Any) -> None:
    for _ in range(9):
        snapshots.refresh(env)
    dry = snapshots.prune(env.KV, 5, dry_run=True)
    assert dry["deleted"] == 4 and len(snapshots.list_versions(env.KV)) == 9
    result = snapshots.prune(env.KV, 5)
    assert result["deleted_versions"] == [1, 2, 3, 4]
    assert [v["version"] for v in snapshots.list_versions(env.KV)] == [5, 6, 7, 8, 9]
    assert snapshots.read_latest(env.KV)["version"] == 9
    assert snapshots.prune(env.KV, 5)["deleted"] == 0


def test_prune_job_is_registered_and_uses_config(db_url: str, make_env: Any) -> None:
    env = make_env(db_url, snapshots={"keep": 2})
    for _ in range(4):
        snapshots.refresh(env)
    result = JOBS["snapshot_prune"](env, clock.now(), False)
    assert result["kept_versions"] == [3, 4] and result["deleted"] == 2


def test_reader_never_sees_a_partial_or_missing_snapshot(env: Any) -> None:
    with freeze_time(NOW, tick=True):
        _consume(env, _events(clock.now_s(), 500, seed=5))
    snapshots.refresh(env)
    expected_paths = len(snapshots.read_latest(env.KV)["paths"])
    done = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        while not done.is_set():
            snap = snapshots.read_latest(env.KV)
            if snap is None:
                problems.append("missing")
            elif len(snap.get("paths", [])) != expected_paths or "generated_at" not in snap:
                problems.append(f"partial: {snap!r:.200}")
            else:
                seen.append(snap["version"])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(25):
            snapshots.refresh(env)
            if i % 5 == 4:
                snapshots.prune(env.KV, 5)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not problems, problems[:3]
    assert seen, "the reader never completed a read"
    assert seen == sorted(seen), "latest moved backwards"
    assert snapshots.read_latest(env.KV)["version"] == 26


def test_snapshot_commands(sqlite_url: str, make_env: Any) -> None:
    import orjson

    env = make_env(sqlite_url)

    def cli(*args: str) -> Any:
        return run_cli(env, *args)

    missing = cli("snapshot", "show")
    assert missing.exit_code == 5 and "no snapshot" in missing.output
    _consume(env, _events(clock.now_s(), 200, seed=8))
    for _ in range(7):
        assert cli("snapshot", "refresh").exit_code == 0
    shown = orjson.loads(cli("snapshot", "show", "--json").stdout)
    assert shown == snapshots.read_latest(env.KV) and shown["version"] == 7
    assert [r["version"] for r in orjson.loads(cli("snapshot", "list", "--json").stdout)] == list(range(1, 8))
    pruned = orjson.loads(cli("snapshot", "prune", "--keep", "3", "--json").stdout)
    assert pruned["kept_versions"] == [5, 6, 7]
    assert cli("snapshot", "prune", "--keep", "0").exit_code == 2
    assert cli("snapshot", "show").exit_code == 0


def test_builder_process_builds_the_same_document(db_url: str, make_env: Any, tmp_path: Any) -> None:
    """The worker's helper process answers with exactly the document built in process; it
    survives a failed build, is started again after it dies, and ends on `close()`."""
    from pipeline.errors import BindingError
    from snapshots.builder import SnapshotBuilder

    env = make_env(db_url, snapshots={"top_n": 5})
    with freeze_time(NOW):
        now_s = clock.now_s()
        _consume(env, _events(now_s, 600, seed=11))
    expected = snapshots.build(env.DB, 24, 5, now_s)
    assert len(expected["paths"]) == 5
    builder = SnapshotBuilder(env.DB.url)
    try:
        assert builder.build(24, 5, now_s) == expected
        first = builder._proc
        assert first.is_alive() and builder.cpu_s > 0
        first.kill()
        first.join()
        assert builder.build(24, 5, now_s) == expected  # a new helper
        assert builder._proc is not first and builder._proc.is_alive()
    finally:
        builder.close()
    assert not first.is_alive() and builder._proc is None

    empty = SnapshotBuilder(f"sqlite:///{tmp_path / 'no-tables.db'}")
    try:
        with pytest.raises(BindingError, match="path_stats_hourly"):
            empty.build(24, 5, now_s)
        helper = empty._proc
        with pytest.raises(BindingError, match="path_stats_hourly"):
            empty.build(24, 5, now_s)
        assert empty._proc is helper  # an error answered, not a crash
    finally:
        empty.close()


def test_worker_refresh_builds_in_the_helper_process_or_in_a_thread(sqlite_url: str, make_env: Any) -> None:
    docs = {}
    for build_in in ("process", "thread"):
        env = make_env(
            sqlite_url.replace("edgepipe.db", f"{build_in}.db"),
            consumer={"max_batch_size": 50, "snapshot_every_batches": 2},
            snapshots={"min_interval_s": 0, "build_in": build_in},
        )
        with freeze_time(NOW):
            env.QUEUE.send_batch(_events(clock.now_s(), 400, seed=12))
            worker = consumer_worker(env)
            try:
                for _ in range(8):
                    assert worker.step(wait=0).ok
                    worker.drain()
                assert (worker.side.builder is not None) == (build_in == "process")
                if worker.side.builder is not None:
                    assert worker.side.builder.cpu_s > 0
            finally:
                worker.close()
            assert worker.side.refreshes == 4
            doc = snapshots.read_latest(env.KV)
            assert doc is not None
            assert doc == snapshots.build(env.DB, 24, 100, clock.now_s()) | {"version": 4}
        docs[build_in] = doc
    assert docs["process"] == docs["thread"]


def test_drain_gives_up_on_a_build_that_does_not_finish(
    sqlite_url: str, make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper that stops answering holds up neither the batches nor the shutdown: the
    build is given up after the drain timeout, and the next refresh starts a new helper."""
    import os
    import signal

    import snapshots.refresher

    env = make_env(sqlite_url, consumer={"max_batch_size": 50, "snapshot_every_batches": 1},
                   snapshots={"min_interval_s": 0})  # fmt: skip
    env.QUEUE.send_batch(_events(clock.now_s(), 200, seed=13))
    worker = consumer_worker(env)
    try:
        assert worker.step(wait=0).ok
        worker.drain()
        assert worker.side.refreshes == 1  # the first build, waited for as long as it takes
        # Only a helper that cannot answer (stopped below) meets the short timeout: a slow
        # machine never makes the test fail.
        monkeypatch.setattr(snapshots.refresher, "DRAIN_TIMEOUT_S", 0.5)
        stuck = worker.side.builder._proc
        os.kill(stuck.pid, signal.SIGSTOP)
        assert worker.step(wait=0).ok  # submits to the stopped helper
        assert worker.side.builder.pending
        assert worker.step(wait=0).ok  # not held up: the build is still pending
        worker.drain()
        assert not worker.side.builder.pending and worker.side.refreshes == 1
        assert not stuck.is_alive()
        monkeypatch.setattr(snapshots.refresher, "DRAIN_TIMEOUT_S", 300.0)  # the new helper: as long as it takes
        assert worker.step(wait=0).ok
        worker.drain()
        assert worker.side.refreshes == 2 and worker.side.builder._proc is not stuck
    finally:
        worker.close()
    assert snapshots.read_latest(env.KV)["version"] == 2
