"""Job runs and leases in the DB binding: the state that makes a job run once per slot. The
scheduler decides and runs jobs with it; the CLI and the HTTP read API list runs through it.

A lease row (job, holder, expires_at) is taken before a run, renewed while it runs and
deleted afterwards. Taking it is one conditional UPDATE (free, expired or already ours),
so on SQLite (one writer at a time) and on PostgreSQL (the row lock re-checks the WHERE)
exactly one contender wins. `job_runs` has a unique (job, scheduled_for, attempt) as a
second line of defence: an attempt can be recorded once.

A lease whose holder (`host:pid:tag`, `pipeline.heartbeat.process_name`) is a process of
THIS host that no longer exists is taken over at once instead of after its expiry (a
SIGKILLed `jobs run` would otherwise block the job for `lease_seconds`): one conditional
UPDATE on that exact holder value, so of several contenders one wins. A holder that is
alive, whose pid cannot be checked (another user's process: alive), of another host or
not of that form is respected until it expires.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline import clock, log
from pipeline.schema import job_leases, job_runs


class RunStatus(StrEnum):
    """`job_runs.status`."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABANDONED = "abandoned"  # its worker died while running it
    DRY_RUN = "dry_run"


RUNNING, ABANDONED = RunStatus.RUNNING, RunStatus.ABANDONED


@dataclass(frozen=True)
class RunRecord:
    """One recorded attempt, as the scheduler's decision reads it."""

    job: str
    scheduled_for: float  # epoch seconds of the slot
    attempt: int
    status: str
    started_at: float
    finished_at: float | None = None


def _record(r: Any) -> RunRecord:
    return RunRecord(r.job, r.scheduled_for, r.attempt, r.status, r.started_at, r.finished_at)


def dead_local_holder(holder: str) -> bool:
    """True only when `holder` names a process of this host that no longer exists:
    `os.kill(pid, 0)` raises ProcessLookupError (PermissionError means it exists)."""
    parts = holder.rsplit(":", 2)  # a host name holds no colon; an IPv6 literal would not match ours anyway
    if len(parts) != 3:
        return False
    host, pid_text, _tag = parts
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) <= 0:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError (another user's process) or anything unexpected: alive
        return False
    return False


class JobStore:
    def __init__(self, db: Any) -> None:
        self.db = db

    # -- leases ------------------------------------------------------------------------

    def acquire(self, job: str, holder: str, ttl: float) -> bool:
        """Take `job`'s lease when it is free, expired, already ours, or held by a dead
        process of this host (logged `lease_taken_over`)."""
        now = clock.now_s()
        with self.db.transaction() as conn:
            conn.execute(
                self.db.insert(job_leases)
                .values(job=job, holder=holder, expires_at=now + ttl)
                .on_conflict_do_nothing(index_elements=["job"])
            )
            conn.execute(
                job_leases.update()
                .where(job_leases.c.job == job, sa.or_(job_leases.c.holder == holder, job_leases.c.expires_at < now))
                .values(holder=holder, expires_at=now + ttl)
            )
            current = conn.execute(sa.select(job_leases.c.holder).where(job_leases.c.job == job)).scalar_one()
            if current == holder:
                return True
            if not dead_local_holder(current):
                return False
            taken = conn.execute(
                job_leases.update()
                .where(job_leases.c.job == job, job_leases.c.holder == current)
                .values(holder=holder, expires_at=now + ttl)
            ).rowcount
        if taken:
            log.event("lease_taken_over", logging.WARNING, job=job, dead_holder=current, holder=holder)
        return bool(taken)

    def renew(self, job: str, holder: str, ttl: float) -> bool:
        with self.db.transaction() as conn:
            result = conn.execute(
                job_leases.update()
                .where(job_leases.c.job == job, job_leases.c.holder == holder)
                .values(expires_at=clock.now_s() + ttl)
            )
        return bool(result.rowcount)

    def release(self, job: str, holder: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(job_leases.delete().where(job_leases.c.job == job, job_leases.c.holder == holder))

    def leases(self) -> dict[str, dict[str, Any]]:
        """Live leases: job -> {holder, expires_at}."""
        with self.db.read() as conn:
            rows = conn.execute(sa.select(job_leases).where(job_leases.c.expires_at >= clock.now_s())).all()
        return {r.job: {"holder": r.holder, "expires_at": r.expires_at} for r in rows}

    @contextmanager
    def lease(self, job: str, holder: str, ttl: float) -> Iterator[bool]:
        """Hold `job`'s lease for the block, renewing it every ttl/3 from a thread.
        Yields False (and holds nothing) when another holder has it."""
        if not self.acquire(job, holder, ttl):
            yield False
            return
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(ttl / 3):
                try:
                    if not self.renew(job, holder, ttl):
                        log.event("lease_lost", job=job, holder=holder)
                        return
                except Exception as exc:  # a missed renewal is retried at the next interval
                    log.event("lease_renew_failed", job=job, error=f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=renew, name=f"lease-{job}", daemon=True)
        thread.start()
        try:
            yield True
        finally:
            stop.set()
            thread.join()
            self.release(job, holder)

    # -- runs ----------------------------------------------------------------------------

    def runs(self, since: float, jobs: list[str] | None = None) -> dict[str, list[RunRecord]]:
        """Recorded attempts of slots at or after `since`, per job (the decision's input)."""
        stmt = sa.select(job_runs).where(job_runs.c.scheduled_for >= since)
        if jobs is not None:
            stmt = stmt.where(job_runs.c.job.in_(jobs))
        out: dict[str, list[RunRecord]] = defaultdict(list)
        with self.db.read() as conn:
            for r in conn.execute(stmt):
                out[r.job].append(_record(r))
        return dict(out)

    def next_attempt(self, job: str, slot: float) -> int:
        with self.db.read() as conn:
            n = conn.execute(
                sa.select(sa.func.max(job_runs.c.attempt)).where(
                    job_runs.c.job == job, job_runs.c.scheduled_for == slot
                )
            )
            return int(n.scalar() or 0) + 1

    def abandon_running(self, job: str) -> int:
        """Mark `job`'s `running` rows abandoned; call only while holding its lease (then
        no run of it is in progress anywhere, so those rows belong to dead workers)."""
        with self.db.transaction() as conn:
            result = conn.execute(
                job_runs.update()
                .where(job_runs.c.job == job, job_runs.c.status == RUNNING)
                .values(status=ABANDONED, finished_at=clock.now_s(), error="worker lost while running")
            )
        return result.rowcount or 0

    def start(self, job: str, slot: float, attempt: int, holder: str, status: str = RUNNING) -> int | None:
        """Record an attempt as started; None when that attempt is already recorded."""
        with self.db.transaction() as conn:
            stmt = (
                self.db.insert(job_runs)
                .values(
                    job=job, scheduled_for=slot, attempt=attempt, status=status, holder=holder, started_at=clock.now_s()
                )
                .on_conflict_do_nothing(index_elements=["job", "scheduled_for", "attempt"])
                .returning(job_runs.c.id)
            )
            return conn.execute(stmt).scalar_one_or_none()

    def finish(self, run_id: int, status: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        text = None if result is None else orjson.dumps(result, default=str).decode()
        with self.db.transaction() as conn:
            conn.execute(
                job_runs.update()
                .where(job_runs.c.id == run_id)
                .values(status=status, finished_at=clock.now_s(), result=text, error=error)
            )

    def history(self, job: str | None = None, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, as public dicts (times in RFC 3339)."""
        stmt = sa.select(job_runs).order_by(job_runs.c.started_at.desc(), job_runs.c.id.desc()).limit(limit)
        if job is not None:
            stmt = stmt.where(job_runs.c.job == job)
        if status is not None:
            stmt = stmt.where(job_runs.c.status == status)
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        return [public(r) for r in rows]

    def last_runs(self) -> dict[str, dict[str, Any]]:
        """The newest run of every job."""
        newest = sa.select(sa.func.max(job_runs.c.id)).group_by(job_runs.c.job).scalar_subquery()
        with self.db.read() as conn:
            rows = conn.execute(sa.select(job_runs).where(job_runs.c.id.in_(newest))).all()
        return {r.job: public(r) for r in rows}


def public(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "job": r.job,
        "scheduled_for": clock.iso(r.scheduled_for),
        "attempt": r.attempt,
        "status": r.status,
        "holder": r.holder,
        "started_at": clock.iso(r.started_at),
        "finished_at": None if r.finished_at is None else clock.iso(r.finished_at),
        "result": None if r.result is None else orjson.loads(r.result),
        "error": r.error,
    }
