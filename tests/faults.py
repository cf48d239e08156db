"""Fault injection around the traffic consumer, shared by the exactly-once and poison tests:
a failure after the consumer's writes and before the commit, or a consumer that dies
holding its batch."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from consumers.traffic import TrafficConsumer
from pipeline.bindings.queue import MessageBatch
from pipeline.config import Config
from pipeline.env import Env
from tests.traffic_truth import Truth, make_events

NOW = "2026-11-20T12:00:00Z"
NOW_MS = 1_795_176_000_000  # NOW in epoch milliseconds


class Crash(BaseException):
    """A consumer dying mid-batch: not an Exception, so the worker does not settle; the
    transaction rolls back and the batch's leases are left to expire."""


class FaultyHandler:
    """The traffic consumer, with a failure after its writes (before the commit) on chosen
    calls, or a crash that abandons the batch."""

    def __init__(self, cfg: Config, fail: set[int], crash: set[int]) -> None:
        self.inner = TrafficConsumer(cfg).handle_batch
        self.fail, self.crash = fail, crash
        self.calls = 0

    def __call__(self, batch: MessageBatch, env: Env, ctx: Any) -> Any:
        call = self.calls
        self.calls += 1
        report = self.inner(batch, env, ctx)
        if call in self.crash:
            raise Crash(f"consumer killed in call {call}")
        if call in self.fail:
            raise RuntimeError(f"injected failure in call {call}")
        return report


def send_events(env: Env, n: int, seed: int) -> list[tuple[dict[str, Any], Truth]]:
    """Send `n` synthetic events (one per message) of the hours before NOW; returns them
    with their expected stored form."""
    pairs = make_events(seed=seed, n=n, now_ms=NOW_MS)
    env.QUEUE.send_batch([body for body, _ in pairs])
    return pairs


def refuse_id(env: Env, event_id: str) -> None:
    """A database that refuses the event `event_id` at insert, as it would an out-of-range
    value."""
    _refuse(env, "traffic_events", "id", event_id)


def refuse_path(env: Env, path: str) -> None:
    """A database that refuses the hourly rows of `path` (written at the commit: see
    `Database.at_commit`), as it would an out-of-range sum."""
    _refuse(env, "path_stats_hourly", "path", path)


def _refuse(env: Env, table: str, column: str, value: str) -> None:
    """A trigger refusing rows of `table` whose `column` is `value`: a constraint error
    (SQLite) or SQLSTATE 22003 (PostgreSQL), "value out of range"."""
    name = f"fault_refuse_{table}"
    with env.DB.transaction() as conn:
        if env.DB.dialect == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                f"WHEN NEW.{column} = '{value}' BEGIN SELECT RAISE(ABORT, 'value out of range'); END"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.{column} = '{value}' THEN RAISE EXCEPTION 'value out of range' USING ERRCODE = '22003'; "
                "END IF; RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"
            )


class DiskFull:
    """While `on`, every insert into `traffic_events` fails the way a full disk makes it
    fail: SQLITE_FULL on SQLite (`max_page_count` pinned to the file's size on the writer
    connection and on every connection checked out meanwhile) and SQLSTATE 53100 on PostgreSQL
    (a trigger reading a flag table). A transient fault: nothing about the events is wrong."""

    def __init__(self, env: Env) -> None:
        self.env, self.on = env, False
        if env.DB.dialect == "sqlite":
            sa.event.listen(env.DB.engine, "checkout", self._pin)
            return
        with env.DB.transaction() as conn:
            conn.exec_driver_sql("CREATE TABLE fault_disk_full (on_ boolean)")
            conn.exec_driver_sql(
                "CREATE FUNCTION fault_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF EXISTS (SELECT 1 FROM fault_disk_full) THEN "
                "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END IF; "
                "RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER fault_disk_full BEFORE INSERT ON traffic_events "
                "FOR EACH ROW EXECUTE FUNCTION fault_disk_full()"
            )

    def _pin(self, dbapi_conn: Any, *_: Any) -> None:
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages if self.on else 1073741823}")

    def set(self, on: bool) -> None:
        self.on = on
        db = self.env.DB
        if db.dialect == "sqlite":
            with db.transaction() as conn:  # the pinned writer connection
                raw = conn.connection.driver_connection
                pages = raw.execute("PRAGMA page_count").fetchone()[0]
                raw.execute(f"PRAGMA max_page_count = {pages if on else 1073741823}")
            return
        with db.transaction() as conn:
            conn.exec_driver_sql("DELETE FROM fault_disk_full")
            if on:
                conn.exec_driver_sql("INSERT INTO fault_disk_full VALUES (true)")
