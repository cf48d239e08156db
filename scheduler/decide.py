"""The scheduler's decision step, as a function of (now, cron table, recorded runs).

No I/O and no clock: given the instant, the cron table, the runs recorded so far and the
jobs whose lease is currently held, it says which job runs to start. The worker calls it
on every tick (and again under the lease before starting, with fresh rows); tests drive
it through a simulated week with frozen time.

Rules, per job, for the latest slot (cron fire time) at or before `now`:
* no run recorded yet and the slot is at most `misfire_grace` old: run it (attempt 1).
  Only the latest slot is ever considered, so several missed slots coalesce into one;
* the last attempt succeeded: nothing to do;
* the last attempt is `running` and the job's lease is held: someone is on it;
  `running` without a live lease means its worker died: treated as failed;
* the last attempt failed and fewer than `max_attempts` were made: retry once
  `retry_backoff × 2^(attempt-1)` seconds have passed since it ended.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pipeline.cron import CronSpec
from pipeline.jobruns import RunRecord, RunStatus

SUCCEEDED, FAILED, RUNNING = RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.RUNNING
ABANDONED, DRY_RUN = RunStatus.ABANDONED, RunStatus.DRY_RUN


@dataclass(frozen=True)
class Policy:
    misfire_grace: float = 3600.0
    max_attempts: int = 3
    retry_backoff: float = 60.0
    lease_seconds: float = 300.0

    def backoff(self, attempt: int) -> float:
        return self.retry_backoff * 2 ** (attempt - 1)

    @property
    def lookback(self) -> timedelta:
        """How far back a slot can still need work: grace, every retry wait, a lost lease."""
        retries = sum(self.backoff(a) for a in range(1, self.max_attempts))
        return timedelta(seconds=self.misfire_grace + retries + self.lease_seconds * self.max_attempts + 60)


@dataclass(frozen=True)
class Due:
    job: str
    scheduled_for: datetime
    attempt: int
    reason: str  # scheduled, catch_up, retry

    @property
    def slot(self) -> float:
        return self.scheduled_for.timestamp()


def decide_job(
    spec: CronSpec, now: datetime, runs: Iterable[RunRecord], policy: Policy, leased: bool = False
) -> Due | None:
    slot = spec.latest_fire(now, policy.lookback)
    if slot is None:
        return None
    ts = slot.timestamp()
    attempts = sorted((r for r in runs if r.scheduled_for == ts and r.status != DRY_RUN), key=lambda r: r.attempt)
    age = (now - slot).total_seconds()
    if not attempts:
        if age > policy.misfire_grace:
            return None
        return Due(spec.name, slot, 1, "scheduled" if age < 60 else "catch_up")
    last = attempts[-1]
    if last.status == SUCCEEDED or (last.status == RUNNING and leased):
        return None
    if last.status not in (FAILED, ABANDONED, RUNNING) or last.attempt >= policy.max_attempts:
        return None
    ended = last.finished_at if last.status != RUNNING and last.finished_at is not None else None
    if ended is not None and now.timestamp() < ended + policy.backoff(last.attempt):
        return None
    return Due(spec.name, slot, last.attempt + 1, "retry")


def decide(
    now: datetime,
    specs: Iterable[CronSpec],
    runs: Mapping[str, Iterable[RunRecord]],
    policy: Policy,
    leased: Collection[str] = (),
) -> list[Due]:
    """Every job run to start at `now` (see the module docstring)."""
    out = []
    for spec in specs:
        due = decide_job(spec, now, runs.get(spec.name, ()), policy, spec.name in leased)
        if due is not None:
            out.append(due)
    return out
