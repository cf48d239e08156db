"""The audit log: who did what, when, from where, and how it ended.

Every audited action writes one `audit_log` row in the transaction of the action itself
(`action(...)`: the row commits with the action's writes, or, when the action fails, a row
with outcome `failed` is written on its own after the rollback). Actions whose effect lives
outside the database (a dead letter redriven on SQS, an object restored from S3) record
their row right after the effect.

Actors: `token:<id>:<name>` for an HTTP request, `cli:<os user>` for a command, `system`
for the runtime itself (the configuration loaded at start-up). Parameters are stored as
JSON; a secret (a token) is never a parameter.

Failed authentication is recorded too, but at most `FAILED_AUTH_PER_MINUTE` rows a minute
per process (`FailedAuthLimiter`): the rest are counted into the next row's `suppressed`
parameter, so a flood of bad tokens cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import getpass
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.schema import audit_log

FAILED_AUTH_PER_MINUTE = 10
MAX_DETAIL = 2000


@dataclass(frozen=True, slots=True)
class Actor:
    name: str  # "token:<id>:<name>", "cli:<os user>", "system"
    token_id: int | None = None
    client: str | None = None  # the client's address, for HTTP requests


def cli_actor() -> Actor:
    """The person at the command line: `cli:<os user>`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "unknown"
    return Actor(f"cli:{user}")


def token_actor(token_id: int, name: str, client: str | None = None) -> Actor:
    return Actor(f"token:{token_id}:{name}", token_id, client)


SYSTEM = Actor("system")


def record(
    db: Database,
    conn: sa.Connection,
    actor: Actor,
    action: str,
    params: dict[str, Any] | None = None,
    outcome: str = "ok",
    detail: str = "",
) -> None:
    """Write one audit row in the caller's transaction."""
    conn.execute(
        audit_log.insert().values(
            at=clock.now_s(),
            actor=actor.name[:200],
            token_id=actor.token_id,
            action=action,
            params=orjson.dumps(params or {}, default=str).decode(),
            outcome=outcome,
            detail=detail[:MAX_DETAIL],
            client=actor.client,
        )
    )


@contextlib.contextmanager
def action(db: Database, actor: Actor, name: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Run an action and audit it: `with audit.action(db, actor, "dlq.redrive", {...}) as
    result:` — the body runs inside a DB transaction that the audit row joins (a DB
    binding call in the body joins it too); what the body puts in `result` is stored with
    the parameters. If the body raises, its writes roll back and a `failed` row is written
    on its own; the exception goes on."""
    result: dict[str, Any] = {}
    try:
        with db.transaction() as conn:
            yield result
            record(db, conn, actor, name, (params or {}) | result)
    except Exception as exc:
        with db.transaction() as conn:
            record(db, conn, actor, name, (params or {}) | result, "failed", f"{type(exc).__name__}: {exc}")
        raise


class FailedAuthLimiter:
    """At most `per_minute` failed-authentication rows a minute; the others are counted and
    reported in the next row written (`suppressed`)."""

    def __init__(self, per_minute: int = FAILED_AUTH_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self._minute = -1
        self._written = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def admit(self) -> int | None:
        """None when this failure is only counted; else the failures suppressed before it."""
        with self._lock:
            minute = int(clock.now_s() // 60)
            if minute != self._minute:
                self._minute, self._written = minute, 0
            if self._written >= self.per_minute:
                self._suppressed += 1
                return None
            self._written += 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


def entries(
    db: Database, since: float | None = None, limit: int = 1000, action_name: str | None = None
) -> list[dict[str, Any]]:
    """Audit rows, oldest first (from `since`, epoch seconds), at most `limit`."""
    stmt = sa.select(audit_log).order_by(audit_log.c.seq).limit(limit)
    if since is not None:
        stmt = stmt.where(audit_log.c.at >= since)
    if action_name is not None:
        stmt = stmt.where(audit_log.c.action == action_name)
    with db.read() as conn:
        rows = conn.execute(stmt).all()
    return [
        {
            "seq": r.seq,
            "at": clock.iso(r.at),
            "actor": r.actor,
            "token_id": r.token_id,
            "action": r.action,
            "params": orjson.loads(r.params),
            "outcome": r.outcome,
            "detail": r.detail,
            "client": r.client,
        }
        for r in rows
    ]


def purge(db: Database, before: float) -> int:
    """Delete rows older than `before` (epoch seconds); returns how many."""
    with db.transaction() as conn:
        return int(conn.execute(audit_log.delete().where(audit_log.c.at < before)).rowcount or 0)
