"""Run one job attempt the way every run is run, scheduled or by hand: take the job's lease,
re-check under it, record the attempt, call the job, record the outcome, release.

The job function is `pipeline.jobs.JOBS[name](env, scheduled_for, dry_run)`; its
result dict goes into `job_runs.result`, an exception into `job_runs.error` (and the
attempt is retried by the scheduler with backoff, up to `max_attempts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline import clock, log
from pipeline.cron import CronSpec
from pipeline.env import Env
from pipeline.errors import NotFound, TransientError, ValidationError
from pipeline.heartbeat import process_name
from pipeline.jobruns import JobStore
from pipeline.jobs import JOBS
from scheduler.decide import DRY_RUN, FAILED, SUCCEEDED, Due, Policy, decide_job

MAX_AHEAD_S = 60.0  # how far in the future a run by hand may be scheduled


def new_holder() -> str:
    return process_name()


def policy_of(config: Any) -> Policy:
    s = config.schedule
    return Policy(s.misfire_grace, s.max_attempts, s.retry_backoff, s.lease_seconds)


@dataclass
class Outcome:
    job: str
    scheduled_for: datetime
    status: str  # succeeded, failed, dry_run, skipped
    attempt: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    ms: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def execute(
    env: Env,
    store: JobStore,
    name: str,
    slot: datetime,
    holder: str,
    dry_run: bool = False,
    recheck: Callable[[], Due | None] | None = None,
) -> Outcome:
    """One attempt of `name` for `slot`, under the job's lease. With `recheck` (scheduled
    runs), the decision is taken again under the lease and its attempt number is used;
    without it (runs by hand), the next attempt number of that slot is."""
    registry = JOBS
    if name not in registry:
        raise NotFound(f"unknown job {name!r} (known: {', '.join(sorted(registry)) or 'none'})")
    ttl = env.config.schedule.lease_seconds
    with store.lease(name, holder, ttl) as held:
        if not held:
            return Outcome(name, slot, "skipped", detail={"why": "lease held elsewhere"})
        store.abandon_running(name)
        if recheck is not None:
            due = recheck()
            if due is None or due.scheduled_for != slot:
                return Outcome(name, slot, "skipped", detail={"why": "already done"})
            attempt = due.attempt
        else:
            attempt = store.next_attempt(name, slot.timestamp())
        run_id = store.start(name, slot.timestamp(), attempt, holder)
        if run_id is None:
            return Outcome(name, slot, "skipped", attempt, detail={"why": "attempt already recorded"})
        return _call(env, store, registry[name], run_id, Outcome(name, slot, "running", attempt), dry_run)


def _call(env: Env, store: JobStore, fn: Any, run_id: int, out: Outcome, dry_run: bool) -> Outcome:
    started = clock.monotonic()
    try:
        out.result = fn(env, out.scheduled_for, dry_run)
        out.status = DRY_RUN if dry_run else SUCCEEDED
        store.finish(run_id, out.status, out.result)
    except Exception as exc:
        out.status, out.error = FAILED, f"{type(exc).__name__}: {exc}"
        store.finish(run_id, FAILED, error=out.error)
    out.ms = round((clock.monotonic() - started) * 1000, 1)
    log.event(
        "job_run",
        logging.INFO if out.status != FAILED else logging.WARNING,
        job=out.job,
        scheduled_for=clock.iso(out.scheduled_for.timestamp()),
        attempt=out.attempt,
        status=out.status,
        ms=out.ms,
        **({"error": out.error} if out.error else {}),
    )
    return out


def run_by_hand(env: Env, name: str, when: datetime | None, dry_run: bool = False) -> Outcome:
    """`edgepipe jobs run NAME [--at T]`: the same lease and recording as scheduled runs.
    Refuses (TransientError) while another process runs the job, and (ValidationError
    naming `--at`) a slot more than `MAX_AHEAD_S` in the future: a run scheduled ahead
    archives rows early and raises the archive watermark past events still to come."""
    slot = clock.now() if when is None else when.astimezone(UTC)
    if slot.timestamp() > clock.now_s() + MAX_AHEAD_S:
        raise ValidationError(
            "--at",
            f"{clock.iso(slot.timestamp())} is more than {MAX_AHEAD_S:.0f} s in the future; a run scheduled ahead "
            "would archive rows early and move the archive watermark past events still to come",
        )
    store = JobStore(env.DB)
    out = execute(env, store, name, slot, new_holder(), dry_run)
    if out.status == "skipped":
        lease = store.leases().get(name, {})
        raise TransientError(f"job {name!r} is running elsewhere (holder {lease.get('holder', '?')}); try later")
    return out


def scheduled_recheck(env: Env, store: JobStore, spec: CronSpec, policy: Policy) -> Callable[[], Due | None]:
    def recheck() -> Due | None:
        now = clock.now()
        since = (now - policy.lookback).timestamp()
        runs = store.runs(since, [spec.name]).get(spec.name, [])
        return decide_job(spec, now, runs, policy, leased=False)

    return recheck
