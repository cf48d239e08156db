"""The registry of scheduled jobs (archive, clean, monitor, rollup, expire, snapshot_prune,
backup): each worker package registers its jobs with `@job`, and the composition root
(`pipeline.cli.compose`) imports those modules.

A job is a plain function `run(env, scheduled_for, dry_run) -> dict` written against
bindings only; its result dict is JSON-serialisable and is what `edgepipe jobs run NAME
--json` prints and what the scheduler stores in `job_runs.result`. `scheduled_for` is the
slot the run belongs to (an aware UTC datetime), never "now": `--at T` sets it, like
`wrangler dev --test-scheduled`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

JobFn = Callable[[Any, datetime, bool], dict[str, Any]]

JOBS: dict[str, JobFn] = {}


def job(name: str) -> Callable[[JobFn], JobFn]:
    """Register a job function under `name`."""

    def register(fn: JobFn) -> JobFn:
        JOBS[name] = fn
        return fn

    return register
