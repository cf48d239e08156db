"""The metrics port of `edgepipe worker` ([worker] metrics_port): a real worker process on a
temporary SQLite database, fed events of every outcome, scraped until its counters show
them all — each count equal to what was sent; a port in use stops the worker at start-up
with one line and exit code 2; SIGTERM closes the port. In process: the monitor's figures
are read at most once per interval, a part that fails is reported alone, and events of a
batch split to isolate its poison are counted too.

`Scrape` and `WorkerProc` are shared with tests/test_promtool.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from consumers.traffic import TrafficConsumer
from pipeline import clock, meta
from pipeline.bindings.queue import MessageBatch
from pipeline.env import Env
from pipeline.errors import DataError
from pipeline.schema import traffic_events, worker_heartbeats
from pipeline.worker import Worker
from pipeline.worker_metrics import MONITOR_ALERTS, WorkerMetrics
from tests.conftest import MakeEnv
from tests.http_support import event, free_port

DEADLINE_S = 90
SILENCE_S = 1.0  # `WorkerProc.until` checks again after this long without a line from the worker
DAY_MS = 86_400_000
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


class Scrape:
    """A parsed scrape: sample values by (name, labels), and every metric name it declares
    (sample names, and the series names of declared families that have no sample yet)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.names: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.names.add(family.name)
            self.names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
            for s in family.samples:
                self.names.add(s.name)
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, metric: str, /, **labels: str) -> float | None:
        return self.samples.get((metric, frozenset(labels.items())))

    def total(self, metric: str) -> float:
        return sum(v for (n, _), v in self.samples.items() if n == metric)

    def labels(self, metric: str, label: str) -> dict[str, float]:
        return {dict(ls)[label]: v for (n, ls), v in self.samples.items() if n == metric}


def scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return Scrape(response.text)


class WorkerProc:
    """`edgepipe worker` in a subprocess over `db_url`, with `config` (TOML) and the metrics
    port `port`; its output in worker.log beside the config."""

    def __init__(self, tmp: Path, db_url: str, config: str, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.url = f"http://127.0.0.1:{port}/metrics"
        cfg = tmp / "worker.toml"
        cfg.write_text(f"{config}\n[worker]\nmetrics_port = {port}\n")
        self.environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")} | {
            "EDGEPIPE_CONFIG": str(cfg),
            "EDGEPIPE_BINDINGS__DB": db_url,
            "EDGEPIPE_BINDINGS__ARCHIVE": f"file://{tmp / 'archive'}",
            "EDGEPIPE_CLEANER__STATS_FILE": str(tmp / "stats.json"),
        }
        self.log_path = tmp / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._output = threading.Condition()
        self._lines = 0  # lines the worker has written so far

    def start(self) -> WorkerProc:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker"], cwd=self.tmp, env=self.environ, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        threading.Thread(target=self._copy_output, daemon=True).start()
        return self

    def _copy_output(self) -> None:
        """Copy the worker's output to worker.log, and wake the waiters at every line (a
        batch, a job run, …: the worker logs its progress) and when it ends."""
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._output:
                    self._lines += 1
                    self._output.notify_all()
        with self._output:
            self._lines += 1
            self._output.notify_all()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"the worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def until(self, check: Callable[[], Any], what: str) -> Any:
        """`check()`'s first truthy value, checked again each time the worker writes a line
        (or, for what it does without a word — the monitor's figures it computes in the
        background when scraped —, after a second of silence); fails at the deadline or
        when the worker exits."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            self.alive()
            with self._output:
                seen = self._lines
            if got := check():
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {what}")
            with self._output:
                self._output.wait_for(lambda n=seen: self._lines != n, timeout=min(left, SILENCE_S))

    def scrape_until(self, condition: Callable[[Scrape], bool], what: str) -> Scrape:
        """Scrape until `condition` holds (the port may not be open yet)."""
        last: list[Scrape] = []

        def settled() -> Scrape | None:
            try:
                last[:] = [scrape(self.url)]
            except httpx.TransportError:
                return None
            return last[0] if condition(last[0]) else None

        try:
            return self.until(settled, what)
        except pytest.fail.Exception:
            print(f"last scrape:\n{last[0].text if last else None}")
            raise

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not stop after SIGTERM")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def worker_proc(tmp_path: Path) -> Iterator[Callable[[str, str], WorkerProc]]:
    made: list[WorkerProc] = []

    def make(db_url: str, config: str) -> WorkerProc:
        made.append(WorkerProc(tmp_path, db_url, config, free_port()))
        return made[-1]

    yield make
    for w in made:
        w.kill()


def settled(events: int) -> Callable[[Scrape], bool]:
    """A worker scrape that counts `events` events, a monitor run, a snapshot and the
    monitor's figures."""
    return lambda s: (
        s.total("edgepipe_consumer_events_total") >= events
        and (s.value("edgepipe_worker_job_runs_total", name="monitor", status="succeeded") or 0) >= 1
        and s.value("edgepipe_snapshot_version") is not None
        and s.value("edgepipe_db_size_bytes") is not None
    )


def wait_for(condition: Callable[[], bool], what: str, proc: WorkerProc) -> None:
    proc.until(condition, what)


CONFIG = """
[consumer]
max_batch_size = 50
max_batch_timeout = 0.2
snapshot_every_batches = 1

[snapshots]
min_interval_s = 0

[schedule]
tick_seconds = 1
lease_seconds = 10
jobs = { monitor = "* * * * *" }
"""


def _feed(env: Env) -> dict[str, int]:
    """Events of every outcome, each its own message: 300 new, 80 sent again, 20 invalid,
    15 older than the archive watermark (too late). Returns the expected counts."""
    now_ms = clock.now_ms()
    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(now_ms - 2 * DAY_MS))
    valid = [event(i) for i in range(300)]
    again = [dict(e) for e in valid[:80]]
    invalid = [event(1000 + i, status="not a status") for i in range(20)]
    too_late = [event(2000 + i, ts=now_ms - 3 * DAY_MS - i) for i in range(15)]
    env.QUEUE.send_batch(valid)
    env.QUEUE.send_batch(again + invalid + too_late)
    return {"inserted": 300, "duplicate": 80, "invalid": 20, "too_late": 15}


def _rows(env: Env, table: Any) -> int:
    with env.DB.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


@pytest.mark.slow
def test_worker_metrics_count_every_event_by_outcome(
    sqlite_url: str, make_env: MakeEnv, worker_proc: Callable[[str, str], WorkerProc]
) -> None:
    env = make_env(sqlite_url)
    expected = _feed(env)
    sent = sum(expected.values())
    worker = worker_proc(sqlite_url, CONFIG).start()
    try:
        # The queue drained (read from the database, not the metrics): the first scrape
        # then computes the monitor's figures over the final state.
        wait_for(lambda: env.QUEUE.stats()["pending"] + env.QUEUE.stats()["in_flight"] == 0, "the queue", worker)
        got = worker.scrape_until(settled(sent), "every event counted, a monitor run, a snapshot, the figures")
        assert got.labels("edgepipe_consumer_events_total", "outcome") == expected
        assert _rows(env, traffic_events) == expected["inserted"]

        ok = got.value("edgepipe_batches_total", outcome="ok")
        assert ok and ok >= sent / 50
        assert got.value("edgepipe_batches_total", outcome="failed") == 0
        assert got.value("edgepipe_batch_latency_seconds_count") == ok
        assert got.value("edgepipe_batch_latency_seconds_bucket", le="+Inf") == ok
        assert got.value("edgepipe_consumer_degraded") == 0

        dead = expected["invalid"] + expected["too_late"]
        assert got.value("edgepipe_queue_depth") == 0
        assert got.value("edgepipe_consumer_lag_seconds") == 0
        assert got.value("edgepipe_dlq_depth") == env.QUEUE.stats()["dlq"] == dead  # one event a message

        assert got.value("edgepipe_worker_job_runs_total", name="monitor", status="failed") == 0
        runs = got.value("edgepipe_worker_job_runs_total", name="monitor", status="succeeded")
        assert got.value("edgepipe_worker_job_duration_seconds_count", name="monitor") == runs
        assert (got.value("edgepipe_job_runs", job="monitor", status="succeeded") or 0) >= 1  # the table's count

        version = got.value("edgepipe_snapshot_version")
        assert version is not None and version >= 1
        age = got.value("edgepipe_snapshot_age_seconds")
        assert age is not None and age >= 0
        checkpoints = got.value("edgepipe_sqlite_wal_checkpoints_total")
        assert checkpoints is not None  # SQLite: reported, from 0
        assert got.value("edgepipe_sqlite_wal_checkpoint_duration_seconds_count") == checkpoints
        assert (got.value("edgepipe_sqlite_wal_checkpoint_duration_seconds_sum") or 0) >= 0

        # The monitor's figures, over the drained queue.
        assert got.value("edgepipe_dead_lettered_events") == dead
        assert got.value("edgepipe_db_table_rows", table="traffic_events") == expected["inserted"]
        assert got.value("edgepipe_db_capacity_bytes") == env.config.monitor.capacity_bytes
        size = got.value("edgepipe_db_size_bytes")
        assert size is not None and size > 0
        assert got.value("edgepipe_workers_alive") == 1
        assert got.value("edgepipe_archive_lag_rows") == 0
        assert got.value("edgepipe_archive_flagged_objects") == 0
        assert set(got.labels("edgepipe_monitor_alert_raised", "alert")) == set(MONITOR_ALERTS)
        assert not [k for (n, k), v in got.samples.items() if n == "edgepipe_scrape_error" and v]
        assert (got.value("process_resident_memory_bytes") or 0) > 0

        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.kill()
    log = worker.log()
    assert "event=metrics_serving" in log
    assert log.index("event=worker_stopped") < log.index("event=metrics_stopped")  # closed last, cleanly
    with pytest.raises(httpx.ConnectError):  # the port was closed with the worker
        httpx.get(worker.url, timeout=5)


@pytest.mark.slow
def test_a_metrics_port_in_use_stops_the_worker_with_one_line(
    sqlite_url: str, make_env: MakeEnv, worker_proc: Callable[[str, str], WorkerProc]
) -> None:
    env = make_env(sqlite_url)
    worker = worker_proc(sqlite_url, CONFIG)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", worker.port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "worker"], cwd=worker.tmp, env=worker.environ, capture_output=True,
            text=True, timeout=DEADLINE_S,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"edgepipe: config error: worker.metrics_port: cannot serve metrics on 127.0.0.1:{worker.port}: address "
        "already in use (choose another port, or metrics_port = 0 to turn the worker's metrics off)"
    ], done.stderr
    assert _rows(env, worker_heartbeats) == 0  # it stopped before anything else


# -- in process ----------------------------------------------------------------------------


def test_monitor_figures_are_read_at_most_once_per_interval(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)
    calls: list[float] = []

    def figures() -> dict[str, Any]:
        from scheduler.monitor import report

        calls.append(clock.monotonic())
        return report(env)

    metrics = WorkerMetrics(env, "127.0.0.1", 0, figures=figures, figures_interval_s=3600)
    first = Scrape(metrics.render().decode())  # the first scrape waits for the first figures
    assert first.value("edgepipe_db_size_bytes") is not None
    for _ in range(5):
        again = Scrape(metrics.render().decode())
        assert again.value("edgepipe_db_size_bytes") == first.value("edgepipe_db_size_bytes")
    assert len(calls) == 1 and metrics.figures is not None and metrics.figures.reads == 1
    age = again.value("edgepipe_monitor_figures_age_seconds")
    assert age is not None and age >= 0

    often = WorkerMetrics(env, "127.0.0.1", 0, figures=figures, figures_interval_s=0)
    for _ in range(3):
        often.render()
        assert often.figures is not None and often.figures.wait_idle(DEADLINE_S)
    assert len(calls) == 4  # interval 0: every scrape starts a read


def test_a_slow_figure_read_never_holds_up_a_scrape(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)
    release = threading.Event()

    def slow() -> dict[str, Any]:
        from scheduler.monitor import report

        value = report(env)
        release.wait(DEADLINE_S)
        return value

    metrics = WorkerMetrics(env, "127.0.0.1", 0, figures=slow, figures_interval_s=0)
    assert metrics.figures is not None
    metrics.figures.first_wait_s = 0  # do not wait for the first figures either
    try:
        text = metrics.render().decode()  # returns while the read is blocked
        assert "edgepipe_queue_depth 0.0" in text
        assert Scrape(text).value("edgepipe_db_size_bytes") is None  # none yet
    finally:
        release.set()
    assert metrics.figures.wait_idle(DEADLINE_S)
    assert Scrape(metrics.render().decode()).value("edgepipe_db_size_bytes") is not None


def test_a_part_that_fails_is_reported_alone(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)

    def broken() -> dict[str, Any]:
        raise RuntimeError("the monitor cannot read the database")

    metrics = WorkerMetrics(env, "127.0.0.1", 0, figures=broken)
    got = Scrape(metrics.render().decode())
    assert got.value("edgepipe_scrape_error", part="monitor") == 1
    assert got.value("edgepipe_db_size_bytes") is None
    assert got.value("edgepipe_queue_depth") == 0  # the rest of the scrape stands
    assert got.value("edgepipe_sqlite_wal_checkpoints_total") == 0


def test_events_of_a_batch_split_around_its_poison_are_counted(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url, consumer={"max_batch_size": 16})
    env.QUEUE.send_batch([event(i) for i in range(16)])
    consumer = TrafficConsumer(env.config)

    def poisoned(batch: MessageBatch, env: Env, ctx: Any) -> Any:
        if any(m.body.get("id") == "ev-5" for m in batch.messages):
            raise DataError("the database refuses ev-5")
        return consumer.handle_batch(batch, env, ctx)

    metrics = WorkerMetrics(env, "127.0.0.1", 0)
    worker = Worker(env, poisoned)
    worker.on_batch.append(metrics.observe_batch)
    result = worker.step(wait=0)
    assert result is not None and not result.ok and result.isolated == 1
    got = Scrape(metrics.render().decode())
    assert got.labels("edgepipe_consumer_events_total", "outcome") == {
        "inserted": 15, "duplicate": 0, "invalid": 0, "too_late": 0,
    }  # fmt: skip
    assert got.value("edgepipe_batches_total", outcome="failed") == 1
    assert _rows(env, traffic_events) == 15


def test_job_outcomes_are_counted_by_job_and_status(sqlite_url: str, make_env: MakeEnv) -> None:
    from scheduler.runner import run_by_hand

    env = make_env(sqlite_url)
    metrics = WorkerMetrics(env, "127.0.0.1", 0, jobs=["monitor", "clean"])
    before = Scrape(metrics.render().decode())
    assert before.value("edgepipe_worker_job_runs_total", name="clean", status="failed") == 0  # from 0
    metrics.observe_job(run_by_hand(env, "monitor", None))
    metrics.observe_job(run_by_hand(env, "monitor", None, dry_run=True))
    got = Scrape(metrics.render().decode())
    assert got.value("edgepipe_worker_job_runs_total", name="monitor", status="succeeded") == 1
    assert got.value("edgepipe_worker_job_runs_total", name="monitor", status="dry_run") == 1
    assert got.value("edgepipe_worker_job_duration_seconds_count", name="monitor") == 2
    assert got.value("edgepipe_job_runs", job="monitor", status="succeeded") == 1  # recorded in job_runs


def test_a_bound_port_is_released_by_close(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url)
    port = free_port()
    metrics = WorkerMetrics(env, "127.0.0.1", port)
    metrics.start()
    try:
        assert "edgepipe_queue_depth" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        metrics.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    again = WorkerMetrics(env, "127.0.0.1", port)  # the port can be had again
    again.start()
    again.close()


def monitor_figures_render(env: Env) -> str:
    """What the worker's metrics render with the monitor's real figures, for a deployment
    started three days ago whose jobs never ran: with `[schedule] misfire_grace = 0` (as
    `env` must have), every job's latest slot is missed, whatever the time of day."""
    assert env.config.schedule.misfire_grace == 0
    from scheduler.monitor import report

    with env.DB.transaction() as conn:
        meta.put(env.DB, conn, meta.DEPLOYMENT_START, clock.iso(clock.now_s() - 3 * 86_400))
    metrics = WorkerMetrics(env, "127.0.0.1", 0, figures=lambda: report(env), jobs=["archive"])
    text = metrics.render().decode()
    assert metrics.figures is not None and metrics.figures.wait_idle(DEADLINE_S)
    return metrics.render().decode() if "edgepipe_db_size_bytes " not in text else text


def test_monitor_figures_show_each_jobs_slot_and_the_alerts_raised(sqlite_url: str, make_env: MakeEnv) -> None:
    env = make_env(sqlite_url, schedule={"misfire_grace": 0})
    got = Scrape(monitor_figures_render(env))
    slots = {
        state: got.value("edgepipe_job_slot_status", name="archive", status=state)
        for state in ("succeeded", "running", "failed", "pending", "missed")
    }
    assert slots == {"succeeded": 0, "running": 0, "failed": 0, "pending": 0, "missed": 1}
    assert got.value("edgepipe_monitor_alert_raised", alert="job_missed") == 1
    assert got.value("edgepipe_monitor_alert_raised", alert="queue") == 0
    assert got.value("edgepipe_db_table_rows", table="traffic_events") == 0
    assert got.value("edgepipe_archive_objects") == 0
