"""The composition root: where the runtime meets the workers built on it. The runtime
(`pipeline`) knows registries and interfaces only; this module (and nothing else in
`pipeline` but the CLI commands and the benchmarks) imports the worker packages and plugs
them in: the traffic consumer as the queue handler, the snapshot refresher as the worker's
side work, the job scheduler and the jobs (registered in `pipeline.jobs.JOBS` by importing
their modules), the monitor's report as the figures of the worker's metrics. The benchmarks
(`pipeline.bench`) reach the workers through here too."""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.env import Env
from pipeline.jobs import JOBS, JobFn
from pipeline.worker import Context, Handler, SideWork, Worker, WorkerProcess

if TYPE_CHECKING:
    from pipeline.worker_metrics import WorkerMetrics


def register_jobs() -> dict[str, JobFn]:
    """Import the modules whose `@job` functions make up the scheduled jobs."""
    import archiver.backup
    import archiver.expire
    import archiver.job  # noqa: F401
    import cleaner.job
    import cleaner.rollup  # noqa: F401
    import scheduler.monitor  # noqa: F401
    import snapshots.job  # noqa: F401

    return JOBS


def traffic_handler(env: Env) -> Handler:
    from consumers.traffic import TrafficConsumer

    return TrafficConsumer(env.config).handle_batch


def snapshot_refresher(env: Env, ctx: Context) -> SideWork | None:
    """The snapshot refresher of a worker on `env` (None when snapshots are off)."""
    from snapshots.refresher import refresher_for

    return refresher_for(env, ctx)


def snapshot_stats(side: SideWork | None) -> tuple[int, float]:
    """(snapshots published, CPU seconds of the builder process) of a snapshot refresher."""
    from snapshots.refresher import SnapshotRefresher

    if not isinstance(side, SnapshotRefresher):
        return 0, 0.0
    return side.refreshes, side.builder.cpu_s if side.builder is not None else 0.0


def refresh_snapshot(env: Env, now_s: float | None = None) -> dict[str, Any]:
    """Build and publish a snapshot now, in this process."""
    from snapshots import refresh

    return refresh(env, now_s)


def consumer_worker(env: Env, handler: Handler | None = None) -> Worker:
    """A worker consuming with the traffic consumer (or `handler`) and refreshing snapshots."""
    ctx = Context()
    return Worker(env, handler or traffic_handler(env), ctx=ctx, side=snapshot_refresher(env, ctx))


def replay_verify(env: Env, start_s: float, end_s: float) -> dict[str, Any]:
    """`edgepipe replay verify` over [start_s, end_s) of the configured archive."""
    from archiver.verify import verify

    return verify(env.DB, env.require_archive(), env.config.archive.prefix, start_s, end_s, config=env.config)


def archive_format() -> tuple[tuple[str, ...], int, re.Pattern[str]]:
    """The archive objects' row fields, gzip level and key pattern (for references that
    serialise or read the same objects by hand)."""
    from archiver.objects import COMPRESS_LEVEL, KEY_RE, ROW_FIELDS

    return ROW_FIELDS, COMPRESS_LEVEL, KEY_RE


def worker_metrics(env: Env, jobs: list[str]) -> WorkerMetrics | None:
    """The metrics port of `edgepipe worker` (`[worker] metrics_port`; None when 0): the
    monitor's report gives its figures, `jobs` (the scheduled jobs) their run counters."""
    cfg = env.config.worker
    if not cfg.metrics_port:
        return None
    from pipeline.worker_metrics import WorkerMetrics
    from scheduler.monitor import report

    return WorkerMetrics(env, cfg.metrics_host, cfg.metrics_port, figures=partial(report, env), jobs=jobs)


def worker_process(env: Env, with_scheduler: bool = True) -> WorkerProcess:
    """`edgepipe worker`: the consumer, the snapshot refresher, (unless told not to) the
    job scheduler and (with `[worker] metrics_port`) the metrics port in one process."""
    factory = None
    jobs: list[str] = []
    if with_scheduler:
        register_jobs()
        from scheduler.service import JobScheduler, load_specs

        jobs = [spec.name for spec in load_specs(env.config)]

        def factory(holder: str, on_run: Any) -> JobScheduler:
            return JobScheduler(env, holder, on_run=on_run)

    return WorkerProcess(
        env,
        traffic_handler(env),
        side=lambda ctx: snapshot_refresher(env, ctx),
        scheduler_factory=factory,
        metrics=worker_metrics(env, jobs),
    )
