"""The composition root: where the runtime meets the workers built on it. The runtime
(`pipeline`) knows registries and interfaces only; this module (and nothing else in
`pipeline` but the CLI commands and the benchmarks) imports the worker packages and plugs
them in: the traffic consumer as the queue handler, the snapshot refresher as the worker's
side work, the job scheduler, the jobs (registered in `pipeline.jobs.JOBS` by importing
their modules) and the snapshot reader of the HTTP read API."""

from __future__ import annotations

from typing import Any

from pipeline.env import Env
from pipeline.jobs import JOBS, JobFn
from pipeline.worker import Context, Handler, Worker, WorkerProcess


def register_jobs() -> dict[str, JobFn]:
    """Import the modules whose `@job` functions make up the scheduled jobs."""
    import archiver.job  # noqa: F401
    import cleaner.job  # noqa: F401
    import scheduler.monitor  # noqa: F401
    import snapshots.job  # noqa: F401

    return JOBS


def traffic_handler(env: Env) -> Handler:
    from consumers.traffic import TrafficConsumer

    return TrafficConsumer(env.config).handle_batch


def consumer_worker(env: Env, handler: Handler | None = None) -> Worker:
    """A worker consuming with the traffic consumer (or `handler`) and refreshing snapshots."""
    from snapshots.refresher import refresher_for

    ctx = Context()
    return Worker(env, handler or traffic_handler(env), ctx=ctx, side=refresher_for(env, ctx))


def worker_process(env: Env, with_scheduler: bool = True) -> WorkerProcess:
    """`edgepipe worker`: the consumer, the snapshot refresher and (unless told not to) the
    job scheduler in one process."""
    from snapshots.refresher import refresher_for

    factory = None
    if with_scheduler:
        register_jobs()
        from scheduler.service import JobScheduler

        def factory(holder: str, on_run: Any) -> JobScheduler:
            return JobScheduler(env, holder, on_run=on_run)

    return WorkerProcess(env, traffic_handler(env), side=lambda ctx: refresher_for(env, ctx), scheduler_factory=factory)
