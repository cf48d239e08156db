"""The audit log: who did what, when, from where, and how it ended.

Where an action's writes live in the DB binding's database (a redrive or purge on the
embedded `db` queue, a replay restore, a token created), its `audit_log` row is written in
the same transaction (`action(...)`): the row commits with the action's writes, or not at
all. Where its effect lives outside that database (dead letters on SQS or Redis, a rebuild
into another database, a job run made of many transactions and of objects in the bucket),
the row is written right after the effect, in a transaction of its own
(`action(..., same_transaction=False)`); a crash between the effect and that commit loses
the row, never the effect. When the action fails, its writes roll back and one row with
outcome `failed` (and the error in `detail`) is written on its own.

Actors: `token:<id>:<name>` for an HTTP request, `cli:<os user>` for a command, `system`
for the runtime itself (the configuration loaded at start-up, `config_loaded`). Parameters
are stored as JSON; a secret (a token, a password in a URL: `public_url`) is never a
parameter.

Failed authentication is recorded too, but at most `FAILED_AUTH_PER_MINUTE` rows a minute
per process (`FailedAuthLimiter`): the rest are counted into the next row's `suppressed`
parameter, so a flood of bad tokens cannot fill the disk.

Rows older than `[audit] retention_days` are deleted by the `clean` job (`purge_expired`).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import sqlalchemy as sa

from pipeline import clock, log
from pipeline.bindings.db import Database
from pipeline.config import Config
from pipeline.schema import audit_log

FAILED_AUTH_PER_MINUTE = 10
MAX_DETAIL = 2000
DAY_S = 86_400


class Outcome(StrEnum):
    OK = "ok"
    PARTIAL = "partial"  # done, but part of its input was skipped (a corrupt archive object)
    FAILED = "failed"  # an error: the action's own writes rolled back
    DENIED = "denied"  # refused: failed authentication, a missing scope


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
    outcome: str = Outcome.OK,
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
            outcome=str(outcome),
            detail=detail[:MAX_DETAIL],
            client=actor.client,
        )
    )


class Result(dict[str, Any]):
    """What the body of `action` adds to the parameters (`result["redriven"] = n`), and,
    when the body returns, how the action ended: `outcome` (`ok` unless the body says
    `partial` or `failed`, e.g. a job that reported its own failure) and `detail`."""

    def __init__(self) -> None:
        super().__init__()
        self.outcome = Outcome.OK
        self.detail = ""


@contextlib.contextmanager
def action(
    db: Database,
    actor: Actor,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    same_transaction: bool = True,
) -> Iterator[Result]:
    """Run an action and audit it with exactly one row: `with audit.action(db, actor,
    "dlq.redrive", {...}) as result:`. What the body puts in `result` is stored with the
    parameters.

    `same_transaction` (for actions whose writes are in `db`): the body runs inside a DB
    transaction that the audit row joins (a DB binding call in the body joins it too). Else
    (an effect outside `db`) the body runs outside any transaction and the row is written
    right after it. If the body raises (or is interrupted), its DB writes roll back and a
    `failed` row is written on its own; the exception goes on. Call it outside any open
    transaction of `db`, or a failure's row would roll back with the caller's."""
    result = Result()
    try:
        if same_transaction:
            with db.transaction() as conn:
                yield result
                record(db, conn, actor, name, (params or {}) | result, result.outcome, result.detail)
            return
        yield result
    except (Exception, KeyboardInterrupt) as exc:
        _record_failure(db, actor, name, (params or {}) | result, exc)
        raise
    with db.transaction() as conn:
        record(db, conn, actor, name, (params or {}) | result, result.outcome, result.detail)


def _record_failure(db: Database, actor: Actor, name: str, params: dict[str, Any], exc: BaseException) -> None:
    """The `failed` row of an action; when even that cannot be written (the database is
    what failed), a log line says so and the action's own error is the one raised."""
    text = " ".join(str(exc).split())
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    try:
        with db.transaction() as conn:
            record(db, conn, actor, name, params, Outcome.FAILED, detail)
    except Exception as again:
        log.event("audit_write_failed", action=name, actor=actor.name, error=f"{type(again).__name__}: {again}")


def public_url(url: str) -> str:
    """`url` without the password of its user part, to be stored as a parameter."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def config_digest(cfg: Config) -> str:
    """sha256 (hex) of the validated configuration: its JSON with sorted keys, so the same
    settings give the same digest whatever the file's key order or the environment
    variables that set them; `source` (where it was read from) is not part of it."""
    data = cfg.model_dump(mode="json")
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def config_loaded(db: Database, cfg: Config, command: str, **params: Any) -> None:
    """The `config.loaded` row of a process starting (`worker`, `serve`), actor `system`:
    params `command`, `source` (the file and environment the configuration came from),
    `sha256` (`config_digest`), plus the `params` given (a worker's `holder`)."""
    with db.transaction() as conn:
        record(db, conn, SYSTEM, "config.loaded",
               {"command": command, "source": cfg.source, "sha256": config_digest(cfg)} | params)  # fmt: skip


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
    db: Database,
    since: float | None = None,
    limit: int = 1000,
    action_name: str | None = None,
    until: float | None = None,
    newest: bool = False,
) -> list[dict[str, Any]]:
    """Audit rows with `since <= at < until` (epoch seconds, either open), oldest first: the
    first `limit` of them, or with `newest` the last `limit`. Keys: seq, at (RFC 3339),
    actor, token_id, action, params (an object), outcome, detail, client."""
    stmt = sa.select(audit_log).order_by(audit_log.c.seq.desc() if newest else audit_log.c.seq).limit(limit)
    if since is not None:
        stmt = stmt.where(audit_log.c.at >= since)
    if until is not None:
        stmt = stmt.where(audit_log.c.at < until)
    if action_name is not None:
        stmt = stmt.where(audit_log.c.action == action_name)
    with db.read() as conn:
        rows = list(conn.execute(stmt))
    if newest:
        rows.reverse()
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


def retention_cutoff_s(retention_days: int, now_s: float) -> float | None:
    """Epoch seconds before which audit rows have expired at `now_s`; None when they are
    kept forever (`[audit] retention_days` = 0)."""
    return None if retention_days <= 0 else now_s - retention_days * DAY_S


def purge_expired(db: Database, retention_days: int, now_s: float) -> int:
    """Delete the rows older than `retention_days` at `now_s` (the `clean` job); returns how
    many (0 when retention is off)."""
    cutoff = retention_cutoff_s(retention_days, now_s)
    return 0 if cutoff is None else purge(db, cutoff)
