"""The scheduler inside the worker process: APScheduler 3 fires a tick at every cron time
of every job and at a short interval; each tick runs the decision step against the
recorded runs and starts what is due, under the job's lease.

APScheduler only says *when* to look. Whether a slot runs, and how often, is decided by
the database (`scheduler.decide` over `job_runs` and `job_leases`), so several workers
can host a scheduler each and every slot still runs once; a worker that starts after a
missed slot catches it up on its first tick (within `misfire_grace`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from pipeline import clock, log
from pipeline.cron import CronSpec, parse_table, zone
from pipeline.env import Env
from pipeline.errors import ConfigError
from pipeline.jobruns import JobStore
from pipeline.jobs import JOBS
from scheduler.decide import decide
from scheduler.runner import Outcome, execute, policy_of, scheduled_recheck


def load_specs(config: Any) -> list[CronSpec]:
    """The cron table from `[schedule]`, checked against the registered jobs."""
    specs = parse_table(config.schedule.jobs, config.schedule.timezone)
    known = JOBS
    unknown = sorted(s.name for s in specs if s.name not in known)
    if unknown:
        raise ConfigError(
            f"config error: schedule.jobs: unknown job(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return specs


class JobScheduler:
    def __init__(self, env: Env, holder: str, on_run: Callable[[Outcome], None] | None = None) -> None:
        self.env = env
        self.holder = holder
        self.specs = load_specs(env.config)
        self.policy = policy_of(env.config)
        self.store = JobStore(env.DB)
        self.on_run = on_run
        self.stopping = threading.Event()
        self._aps: BackgroundScheduler | None = None

    def tick(self) -> list[Outcome]:
        """Start every run that is due now, one after the other. Safe to call anytime."""
        if self.stopping.is_set():
            return []
        now = clock.now()
        try:
            runs = self.store.runs((now - self.policy.lookback).timestamp())
            leased = set(self.store.leases())
        except Exception as exc:  # the DB is unreachable: try again at the next tick
            log.event("scheduler_tick_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
            return []
        outcomes = []
        by_name = {s.name: s for s in self.specs}
        for due in decide(now, self.specs, runs, self.policy, leased):
            if self.stopping.is_set():
                break
            spec = by_name[due.job]
            recheck = scheduled_recheck(self.env, self.store, spec, self.policy)
            try:
                out = execute(self.env, self.store, due.job, due.scheduled_for, self.holder, recheck=recheck)
            except Exception as exc:
                log.event("scheduler_run_failed", logging.WARNING, job=due.job, error=f"{type(exc).__name__}: {exc}")
                continue
            outcomes.append(out)
            if self.on_run is not None and out.status != "skipped":
                self.on_run(out)
        return outcomes

    def start(self) -> None:
        """Start APScheduler's thread: a tick at each cron time, at an interval, and now."""
        cfg = self.env.config.schedule
        aps = BackgroundScheduler(
            timezone=zone(cfg.timezone),
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(1, int(cfg.misfire_grace))},
        )
        for spec in self.specs:
            aps.add_job(self.tick, spec.trigger, id=f"cron:{spec.name}", name=spec.name)
        aps.add_job(
            self.tick,
            IntervalTrigger(seconds=cfg.tick_seconds, timezone=zone(cfg.timezone)),
            id="tick",
            next_run_time=clock.now() + timedelta(milliseconds=10),
        )
        aps.start()
        self._aps = aps
        log.event("scheduler_started", jobs=",".join(f"{s.name}={s.expr!r}" for s in self.specs), tz=cfg.timezone)

    def stop(self, wait: bool = True) -> None:
        """Take no new runs; with `wait`, let the run in hand finish (it releases its lease)."""
        self.stopping.set()
        if self._aps is not None:
            self._aps.shutdown(wait=wait)
            self._aps = None
