"""Prometheus metrics of `edgepipe worker`, on its own port (`[worker] metrics_port`, 0 = off;
`metrics_host`, 127.0.0.1 by default).

One `CollectorRegistry` per `WorkerMetrics`, served by prometheus_client's WSGI server on a
daemon thread from `start()` to `close()`. The definitions are shared with `edgepipe
serve`'s `/metrics` (`pipeline.http.metrics`): the consumer's metrics (`ConsumerMetrics`:
batches, batch latency, events by outcome) and the collector of the bindings' figures
(`_BindingCollector`: queue depth, in flight, DLQ depth, consumer lag, recorded job runs,
`edgepipe_scrape_error{part}`), to which the worker adds its parts, each read at scrape
time and reported failed on its own:

- `snapshot`: version and age of the KV snapshot (`snapshot:latest`);
- `checkpoints`: the SQLite WAL checkpoints of this process's writer (none on PostgreSQL);
- `monitor`: the monitor's figures (`figures`, composed by the CLI: the `monitor` job's
  report), computed in a background thread at most every `figures_interval_s` seconds
  (5 minutes) while scrapes come, and cached in between, so a scrape is cheap and never
  waits for the report (but the first one, up to 5 s): database size and capacity,
  archive and clean lag, dead-lettered events, workers alive, each job's latest cron
  slot, flagged archive objects and which of the monitor's alerts its report raises.

Job runs of this process (counts by status, durations) come from the scheduler's `on_run`
callback (`observe_job`), batches from the worker's `on_batch` (`observe_batch`).

The runtime never imports the workers: the monitor's report arrives as a plain callable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import start_wsgi_server

from pipeline import clock, log
from pipeline.env import Env
from pipeline.errors import ConfigError
from pipeline.http.metrics import ConsumerMetrics, _BindingCollector
from pipeline.snapshot_doc import read_latest

DAY_S = 86_400
FIGURES_INTERVAL_S = 300.0  # the monitor's figures are computed at most this often (while scraped)
FIRST_WAIT_S = 5.0  # the first scrape waits this long for the first figures
CLOSE_WAIT_S = 10.0
JOB_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
JOB_STATUSES = ("succeeded", "failed")  # counted from 0 for every scheduled job
SLOT_STATES = ("succeeded", "running", "failed", "pending", "missed")  # the monitor's `jobs[…].status`
MONITOR_ALERTS = (
    "capacity",
    "archive_lag",
    "clean_lag",
    "queue",
    "queue_age",
    "dlq",
    "no_worker",
    "job_failed",
    "job_missed",
    "archive_corrupt",
)


class Cached:
    """The value of `read()`, refreshed in a background thread at most every `interval_s`
    seconds and only while someone asks (`get`), so asking never waits for a slow read (the
    monitor's sizes scan the whole database on SQLite) — but the very first `get` waits up
    to `first_wait_s` for the first value. A failed read raises from `get` until a later
    one succeeds."""

    def __init__(
        self, read: Callable[[], dict[str, Any]], interval_s: float, first_wait_s: float = FIRST_WAIT_S
    ) -> None:
        self.read = read
        self.interval_s = interval_s
        self.first_wait_s = first_wait_s
        self.reads = 0  # reads started
        self._cond = threading.Condition()
        self._started_at: float | None = None
        self._running = False
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._error: Exception | None = None

    def get(self) -> tuple[dict[str, Any], float] | None:
        """(the value, its age in seconds), or None while the first read runs."""
        with self._cond:
            now = clock.monotonic()
            if not self._running and (self._started_at is None or now - self._started_at >= self.interval_s):
                self._running, self._started_at = True, now
                self.reads += 1
                threading.Thread(target=self._refresh, name="edgepipe-metrics-figures", daemon=True).start()
            if self._value is None and self._error is None:
                self._cond.wait_for(lambda: not self._running, timeout=self.first_wait_s)
            if self._error is not None:
                raise self._error
            if self._value is None:
                return None
            return self._value, max(0.0, clock.monotonic() - self._at)

    def _refresh(self) -> None:
        _lowest_priority()
        value: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            value = self.read()
        except Exception as exc:
            error = exc
            log.event("metrics_figures_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
        with self._cond:
            self._value, self._error, self._running = value, error, False
            if value is not None:
                self._at = clock.monotonic()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no read runs (tests and shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running, timeout=timeout)


def _lowest_priority() -> None:
    """Run this thread at the lowest CPU priority (Linux schedules threads as tasks)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    """A gauge; with `value` None, declared without a sample (the figure is unknown now)."""
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], value)
    return family


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def figure_families(r: dict[str, Any], age_s: float) -> list[Any]:
    """The monitor's report `r` as metric families (a figure the report lacks is declared
    without a sample)."""
    archive = r.get("archive") or {}
    out = [
        _gauge("edgepipe_db_size_bytes", "Size of the database (the monitor's db_bytes)", r["db_bytes"]),
        _gauge("edgepipe_db_capacity_bytes", "The database's capacity ([monitor] capacity_bytes)", r["capacity_bytes"]),
        _gauge(
            "edgepipe_db_time_to_full_seconds",
            "Projected time until the database reaches its capacity, from its growth over 7 days (none without growth)",
            _times(r.get("days_until_full"), DAY_S),
        ),
        _gauge(
            "edgepipe_archive_lag_rows",
            "Un-archived rows older than [retention] detail_days + 1 days (alert archive_lag)",
            r["archive_lag_rows"],
        ),
        _gauge(
            "edgepipe_archive_oldest_unarchived_age_seconds",
            "Age of the oldest detail row not archived yet (none when every row is)",
            _times(r.get("oldest_unarchived_age_days"), DAY_S),
        ),
        _gauge(
            "edgepipe_clean_lag_rows",
            "Rows of archive objects verified more than a day ago still in the database (alert clean_lag)",
            r["clean_lag_rows"],
        ),
        _gauge(
            "edgepipe_clean_incomplete_rows",
            "Rows verified objects still hold when the last clean run stopped on its time budget, else 0",
            r["clean_incomplete_rows"] or 0,
        ),
        _gauge(
            "edgepipe_dead_lettered_events",
            "Events dead-lettered for good, in the DLQ or purged (a redrive takes them back)",
            r["rejected_total"],
        ),
        _gauge("edgepipe_workers_seen", "Workers with a heartbeat row within [worker] forget_after", r["workers_seen"]),
        _gauge("edgepipe_workers_alive", "Workers seen that are neither dead nor stopped", r["workers_alive"]),
        _gauge("edgepipe_archive_objects", "Archive objects in the bucket", archive.get("objects")),
        _gauge("edgepipe_archive_rows", "Rows held by the archive objects in the bucket", archive.get("rows")),
        _gauge("edgepipe_archive_size_bytes", "Bytes of the archive objects in the bucket", archive.get("bytes")),
        _gauge(
            "edgepipe_archive_flagged_objects",
            "Archive objects flagged corrupt or mismatch (alert archive_corrupt)",
            len(r.get("archive_flagged") or ()),
        ),
        _gauge("edgepipe_monitor_figures_age_seconds", "Age of the monitor's figures in this scrape", age_s),
    ]
    sizes = GaugeMetricFamily("edgepipe_db_table_size_bytes", "Size of each edgepipe table", labels=["table"])
    for table, size in sorted((r.get("table_bytes") or {}).items()):
        sizes.add_metric([table], size)
    out.append(sizes)
    rows = GaugeMetricFamily("edgepipe_db_table_rows", "Rows of each edgepipe table", labels=["table"])
    for table, n in sorted((r.get("rows") or {}).items()):
        rows.add_metric([table], n)
    out.append(rows)
    slots = GaugeMetricFamily(
        "edgepipe_job_slot_status",
        "Each scheduled job's latest cron slot: 1 for its state (succeeded, running, failed, pending, missed)",
        labels=["name", "status"],
    )
    for name, job in sorted((r.get("jobs") or {}).items()):
        for state in dict.fromkeys((*SLOT_STATES, job["status"])):
            slots.add_metric([name, state], 1 if job["status"] == state else 0)
    out.append(slots)
    raised = {a["name"] for a in r.get("raised") or ()}
    alerts = GaugeMetricFamily(
        "edgepipe_monitor_alert_raised",
        "1 when the monitor's report raises this alert, with the configured [monitor] thresholds",
        labels=["alert"],
    )
    for name in dict.fromkeys((*MONITOR_ALERTS, *sorted(raised))):
        alerts.add_metric([name], 1 if name in raised else 0)
    out.append(alerts)
    return out


class WorkerMetrics:
    """The metrics of one `edgepipe worker` process (see the module docstring). `figures`:
    the monitor's report, read at most every `figures_interval_s`; `jobs`: the scheduled
    jobs, whose run counters start at 0."""

    def __init__(
        self,
        env: Env,
        host: str,
        port: int,
        figures: Callable[[], dict[str, Any]] | None = None,
        jobs: Iterable[str] = (),
        figures_interval_s: float = FIGURES_INTERVAL_S,
    ) -> None:
        self.env = env
        self.host, self.port = host, port
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumer = ConsumerMetrics(r)
        self.job_runs = Counter(
            "edgepipe_worker_job_runs",
            "Job runs of this worker's scheduler, by job and status (succeeded, failed, dry_run)",
            ["name", "status"],
            registry=r,
        )
        self.job_duration = Histogram(
            "edgepipe_worker_job_duration_seconds",
            "Duration of the job runs of this worker's scheduler, by job",
            ["name"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        for name in jobs:
            self.job_duration.labels(name)
            for status in JOB_STATUSES:
                self.job_runs.labels(name, status)
        self.figures = None if figures is None else Cached(figures, figures_interval_s)
        parts: Sequence[tuple[str, Callable[[], Iterable[Any]]]] = [
            ("snapshot", self._snapshot),
            ("checkpoints", self._checkpoints),
            *([("monitor", self._figures)] if self.figures is not None else []),
        ]
        r.register(_BindingCollector(env, parts))
        ProcessCollector(registry=r)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- what the worker reports -----------------------------------------------------------

    def observe_batch(self, result: Any) -> None:
        """A `Worker.on_batch` callback."""
        self.consumer.observe_batch(result)

    def observe_job(self, outcome: Any) -> None:
        """The scheduler's `on_run` callback: a `scheduler.runner.Outcome` (job, status, ms)."""
        if outcome.status == "skipped":
            return
        self.job_runs.labels(outcome.job, outcome.status).inc()
        self.job_duration.labels(outcome.job).observe(outcome.ms / 1000)

    # -- read at scrape time ---------------------------------------------------------------

    def _snapshot(self) -> list[Any]:
        doc = read_latest(self.env.KV)  # None before the first refresh: declared without a sample
        age = None if doc is None else max(0.0, clock.now_s() - clock.parse_time(doc["generated_at"]))
        return [
            _gauge(
                "edgepipe_snapshot_version",
                "Version of the newest KV snapshot (snapshot:latest)",
                None if doc is None else doc["version"],
            ),
            _gauge("edgepipe_snapshot_age_seconds", "Age of the newest KV snapshot (since its generated_at)", age),
        ]

    def _checkpoints(self) -> list[Any]:
        """SQLite: the background WAL checkpointer of this process's writer (started by its
        first write transaction). Other dialects have none: nothing is reported."""
        if self.env.DB.dialect != "sqlite":
            return []
        checkpointer = self.env.DB.checkpointer
        runs = 0 if checkpointer is None else checkpointer.runs
        locked = 0 if checkpointer is None else checkpointer.locked_runs
        seconds = 0.0 if checkpointer is None else checkpointer.seconds
        return [
            SummaryMetricFamily(
                "edgepipe_sqlite_wal_checkpoint_duration_seconds",
                "Time spent in background WAL checkpoints of this process's SQLite writer",
                count_value=runs,
                sum_value=seconds,
            ),
            CounterMetricFamily(
                "edgepipe_sqlite_wal_checkpoints",
                "Background WAL checkpoints of this process's SQLite writer",
                value=runs,
            ),
            CounterMetricFamily(
                "edgepipe_sqlite_wal_checkpoints_locked",
                "WAL checkpoints that had to hold this process's writer lock (the WAL had grown past its limit)",
                value=locked,
            ),
        ]

    def _figures(self) -> list[Any]:
        assert self.figures is not None
        got = self.figures.get()
        return [] if got is None else figure_families(*got)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the port --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on `host:port` (a daemon thread serves scrapes). A port that cannot be
        had (in use, privileged) or an address that is not this host's stops the worker at
        start-up: `ConfigError` (exit code 2), one line naming the key."""
        try:
            self._server, self._thread = start_wsgi_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            port = exc.errno in (errno.EADDRINUSE, errno.EACCES)
            key, fix = ("metrics_port", "another port") if port else ("metrics_host", "an address of this host")
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(
                f"config error: worker.{key}: cannot serve metrics on {self.host}:{self.port}: {why} "
                f"(choose {fix}, or metrics_port = 0 to turn the worker's metrics off)"
            ) from None
        log.event("metrics_serving", host=self.host, port=self.port)

    def close(self) -> None:
        """Stop serving and release the port; give a refresh of the figures in progress up
        to `CLOSE_WAIT_S` to end (it reads the database the worker is about to close)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=CLOSE_WAIT_S)
            self._thread = None
        if self.figures is not None:
            self.figures.wait_idle(CLOSE_WAIT_S)
        log.event("metrics_stopped", port=self.port)
