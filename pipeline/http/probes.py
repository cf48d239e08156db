"""What `/ready` and `/metrics` read from the bindings. Blocking: run in a thread.

Each readiness check returns None when healthy, or a short reason. A binding that this
deployment does not configure (`env.KV` / `env.ARCHIVE` is None) is reported as
"not configured" and does not fail readiness.
"""

from __future__ import annotations

import contextlib
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.env import Env
from pipeline.errors import NotFound
from pipeline.schema import job_runs, worker_heartbeats

NOT_CONFIGURED = "not configured"
PROBE_KEY = "_edgepipe/ready-probe"


def check_db(env: Env) -> str | None:
    with env.DB.read() as conn:
        conn.execute(sa.select(1)).scalar_one()
    return None


def check_queue(env: Env) -> str | None:
    env.QUEUE.stats()
    return None


def check_kv(env: Env) -> str | None:
    if env.KV is None:
        return NOT_CONFIGURED
    env.KV.get(PROBE_KEY)
    return None


def check_archive(env: Env) -> str | None:
    """List a prefix and head a missing key: a reachable store answers "nothing there";
    an unreachable one (or a file store whose root is gone bad) raises."""
    store = env.ARCHIVE
    if store is None:
        return NOT_CONFIGURED
    next(iter(store.list(PROBE_KEY)), None)
    with contextlib.suppress(NotFound):
        store.head(PROBE_KEY)
    return None


def check_worker(env: Env) -> str | None:
    """A worker that is not stopped was seen within `[http] heartbeat_max_age` seconds."""
    with env.DB.read() as conn:
        last = conn.execute(
            sa.select(sa.func.max(worker_heartbeats.c.last_seen_at)).where(worker_heartbeats.c.state != "stopped")
        ).scalar()
    if last is None:
        return "no worker heartbeat"
    age = clock.now_s() - float(last)
    if age > env.config.http.heartbeat_max_age:
        return f"last worker heartbeat {age:.0f} s ago (max {env.config.http.heartbeat_max_age:.0f} s)"
    return None


CHECKS = {"db": check_db, "queue": check_queue, "kv": check_kv, "archive": check_archive, "worker": check_worker}


def oldest_message_age(env: Env) -> float:
    """Consumer lag: seconds since the oldest message still in the queue was enqueued."""
    return env.QUEUE.oldest_age_s()


def job_run_counts(env: Env) -> list[tuple[str, str, int]]:
    with env.DB.read() as conn:
        rows = conn.execute(
            sa.select(job_runs.c.job, job_runs.c.status, sa.func.count()).group_by(job_runs.c.job, job_runs.c.status)
        ).all()
    return [(r[0], r[1], int(r[2])) for r in rows]


def queue_stats(env: Env) -> dict[str, Any]:
    return env.QUEUE.stats()
