"""Worker heartbeats: one row per worker process, so `edgepipe status` and the HTTP health
check can tell a live worker from a stuck or vanished one.

A worker writes its row every `BEAT_EVERY_S` seconds (and at start and stop), recording
when it last finished a batch and a job run. A row not refreshed for `[worker] dead_after` is a
dead worker (killed, or its host gone); a live worker that has not finished a
batch for `IDLE_STUCK_AFTER_S` while messages are waiting is stuck in its consumer.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from pipeline import clock, log
from pipeline.schema import worker_heartbeats

BEAT_EVERY_S = 5.0
DEAD_AFTER_S = 120.0  # defaults of [worker] dead_after and forget_after
FORGET_AFTER_S = 86_400.0
IDLE_STUCK_AFTER_S = 300.0


def process_name() -> str:
    """This process's name in heartbeats and job leases: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Heartbeat:
    db: Any
    holder: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=clock.now_s)
    last_batch_at: float | None = None
    last_job_at: float | None = None
    batches: int = 0
    state: str = "running"  # running, degraded (backing off a transient fault), stopping, stopped
    _last_beat: float = 0.0

    def batch_done(self) -> None:
        self.last_batch_at = clock.now_s()
        self.batches += 1

    def job_done(self) -> None:
        self.last_job_at = clock.now_s()

    def beat(self, state: str | None = None, force: bool = False) -> None:
        """Write the row when due (or `force`), in `state` (which becomes the current one).
        A failed write is logged, never raised: the heartbeat must not stop the work it
        reports on (a worker backing off a database fault cannot write it either)."""
        if state is not None:
            self.state = state
        state = self.state
        now = clock.now_s()
        if not force and now - self._last_beat < BEAT_EVERY_S:
            return
        self._last_beat = now
        row = {
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "state": state,
            "started_at": self.started_at,
            "last_seen_at": now,
            "last_batch_at": self.last_batch_at,
            "last_job_at": self.last_job_at,
            "batches": self.batches,
        }
        stmt = self.db.insert(worker_heartbeats).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=["holder"], set_={k: stmt.excluded[k] for k in row})
        try:
            with self.db.transaction() as conn:
                conn.execute(stmt)
        except Exception as exc:
            log.event("heartbeat_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")


def status(
    db: Any,
    queue_depth: int | None = None,
    now_s: float | None = None,
    dead_after: float = DEAD_AFTER_S,
    forget_after: float = FORGET_AFTER_S,
) -> dict[str, Any]:
    """Every known worker with a verdict (`ok`, `degraded`, `stuck`, `dead`, `stopped`), and
    `healthy`: at least one worker is alive and working (verdict `ok`). A worker whose
    heartbeat is older than `dead_after` is `dead` (SIGKILLed, or its host gone); dead and
    stopped rows older than `forget_after` are no longer listed (`forget` deletes them)."""
    now = clock.now_s() if now_s is None else now_s
    with db.read() as conn:
        rows = conn.execute(
            sa.select(worker_heartbeats).where(worker_heartbeats.c.last_seen_at > now - forget_after)
        ).all()
    workers = []
    for r in sorted(rows, key=lambda r: (r.started_at, r.holder)):
        verdict, reason = "ok", ""
        silent = now - r.last_seen_at
        if r.state == "stopped":
            verdict = "stopped"
        elif silent > dead_after:
            verdict, reason = "dead", f"no heartbeat for {silent:.0f} s"
        elif r.state == "degraded":
            verdict, reason = "degraded", "backing off a transient fault (see its log: event=worker_degraded)"
        elif queue_depth and (idle := now - (r.last_batch_at or r.started_at)) > IDLE_STUCK_AFTER_S:
            verdict, reason = "stuck", f"{queue_depth} messages waiting, no batch for {idle:.0f} s"
        workers.append(
            {
                "holder": r.holder,
                "host": r.host,
                "pid": r.pid,
                "state": r.state,
                "verdict": verdict,
                "reason": reason,
                "started_at": clock.iso(r.started_at),
                "last_seen_at": clock.iso(r.last_seen_at),
                "last_batch_at": None if r.last_batch_at is None else clock.iso(r.last_batch_at),
                "last_job_at": None if r.last_job_at is None else clock.iso(r.last_job_at),
                "batches": r.batches,
            }
        )
    healthy = any(w["verdict"] == "ok" for w in workers)
    return {"healthy": healthy, "queue_depth": queue_depth, "workers": workers}


def forget(db: Any, dead_after: float = DEAD_AFTER_S, now_s: float | None = None) -> int:
    """Delete the rows of dead workers (not stopped, no heartbeat for `dead_after`); returns
    how many (`edgepipe status --forget-dead`)."""
    now = clock.now_s() if now_s is None else now_s
    hb = worker_heartbeats.c
    gone = sa.and_(hb.state != "stopped", hb.last_seen_at < now - dead_after)
    with db.transaction() as conn:
        return int(conn.execute(worker_heartbeats.delete().where(gone)).rowcount or 0)
