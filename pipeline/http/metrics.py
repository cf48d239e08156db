"""Prometheus metrics for `/metrics`, in a registry of the app's own (so two apps in one
process, as in tests, never share counters).

Counters and the batch-latency histogram are updated as things happen in this process;
queue depth, DLQ depth, consumer lag and job runs by status are read from the bindings at
scrape time by a custom collector. A binding that fails during a scrape is reported as
`edgepipe_scrape_error{part=…} 1` instead of failing the whole scrape.

The consumer's metrics (`ConsumerMetrics`) and the binding collector are shared with the
metrics port of `edgepipe worker` (`pipeline.worker_metrics`), which adds its own parts to
the collector (`parts`): the same names, whichever process a consumer runs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline import log
from pipeline.env import Env
from pipeline.http import probes
from pipeline.http.auth import Denial

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The outcomes of the events of committed batches (`edgepipe_consumer_events_total`) and
# the handler report's field counting each (`consumers.traffic.BatchReport.as_dict()`).
EVENT_OUTCOMES = {"inserted": "inserted", "duplicate": "duplicates", "invalid": "invalid", "too_late": "too_late"}
BATCH_OUTCOMES = ("ok", "failed", "transient")

# A part of a scrape beside the bindings': (name in `edgepipe_scrape_error{part}`, a function
# returning its metric families). A part that raises is reported failed, the others stand.
Part = tuple[str, Callable[[], Iterable[Any]]]


class _BindingCollector(Collector):
    def __init__(self, env: Env, parts: Sequence[Part] = ()) -> None:
        self.env = env
        self.parts = tuple(parts)

    def collect(self) -> Iterator[Any]:
        errors = GaugeMetricFamily("edgepipe_scrape_error", "1 when a part could not be read", labels=["part"])
        try:
            s = probes.queue_stats(self.env)
            yield GaugeMetricFamily(
                "edgepipe_queue_depth", "Messages pending or in flight", value=s["pending"] + s["in_flight"]
            )
            yield GaugeMetricFamily("edgepipe_queue_in_flight", "Messages leased by a consumer", value=s["in_flight"])
            yield GaugeMetricFamily("edgepipe_dlq_depth", "Messages in the dead-letter queue", value=s["dlq"])
        except Exception as exc:
            self._failed(errors, "queue", exc)
        try:
            yield GaugeMetricFamily(
                "edgepipe_consumer_lag_seconds",
                "Age of the oldest message still in the queue",
                value=probes.oldest_message_age(self.env),
            )
        except Exception as exc:
            self._failed(errors, "consumer_lag", exc)
        try:
            runs = GaugeMetricFamily(
                "edgepipe_job_runs", "Recorded job runs by job and status", labels=["job", "status"]
            )
            for job, status, n in probes.job_run_counts(self.env):
                runs.add_metric([job, status], n)
            yield runs
        except Exception as exc:
            self._failed(errors, "job_runs", exc)
        for part, read in self.parts:
            try:
                families = list(read())  # whole, or not at all
            except Exception as exc:
                self._failed(errors, part, exc)
                continue
            yield from families
        yield errors

    @staticmethod
    def _failed(errors: GaugeMetricFamily, part: str, exc: Exception) -> None:
        errors.add_metric([part], 1)
        log.event("metrics_scrape_failed", logging.WARNING, part=part, error=f"{type(exc).__name__}: {exc}")


class ConsumerMetrics:
    """The metrics of consumers running in a process, on `registry`: batches by outcome, the
    batch-latency histogram, the degraded flag and the events of committed batches by
    outcome. `observe_batch` is a `Worker.on_batch` callback."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.batch_latency = Histogram(
            "edgepipe_batch_latency_seconds",
            "Consumer batch latency of workers running in this process",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "edgepipe_batches", "Consumer batches by outcome (ok, failed, transient)", ["outcome"], registry=r
        )
        self.degraded = Gauge(
            "edgepipe_consumer_degraded", "1 while a consumer of this process backs off a transient fault", registry=r
        )
        self.events = Counter(
            "edgepipe_consumer_events",
            "Events of batches committed by consumers of this process, by outcome "
            "(inserted, duplicate, invalid, too_late)",
            ["outcome"],
            registry=r,
        )
        for outcome in BATCH_OUTCOMES:
            self.batches.labels(outcome)
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)

    def observe_batch(self, result: Any) -> None:
        """A `Worker.on_batch` callback."""
        self.degraded.set(1 if result.transient else 0)
        if result.transient:
            self.batches.labels("transient").inc()
            return
        self.batch_latency.observe(result.ms / 1000)
        self.batches.labels("ok" if result.ok else "failed").inc()
        report = result.report
        counts = report.as_dict() if hasattr(report, "as_dict") else report if isinstance(report, dict) else {}
        for outcome, key in EVENT_OUTCOMES.items():
            if counts.get(key):
                self.events.labels(outcome).inc(counts[key])


class Metrics:
    def __init__(self, env: Env) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "edgepipe_events_accepted", "Events accepted and enqueued by POST /v1/events", registry=r
        )
        self.rejected = Counter("edgepipe_events_rejected", "Events rejected by POST /v1/events", registry=r)
        self.refused = Counter(
            "edgepipe_requests_refused", "POST /v1/events requests refused as a whole", ["code"], registry=r
        )
        self.auth_failures = Counter(
            "edgepipe_http_auth_failures",
            "Requests refused by authentication (401, by reason) or for a token's scope (403, reason `scope`)",
            ["reason"],
            registry=r,
        )
        for reason in (*Denial, "scope"):  # every reason from 0, so rate() sees the first failure
            self.auth_failures.labels(reason)
        self.rate_limited = Counter(
            "edgepipe_http_rate_limited", "Requests refused with 429: over the caller's rate limit", registry=r
        )
        self.consumer = ConsumerMetrics(r)
        self.batch_latency = self.consumer.batch_latency
        self.batches = self.consumer.batches
        self.degraded = self.consumer.degraded
        r.register(_BindingCollector(env))

    def observe_batch(self, result: Any) -> None:
        """A `Worker.on_batch` callback."""
        self.consumer.observe_batch(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
