"""The DLQ managed by reason and age (list, redrive, purge), and the lasting count of dead
letters per reason (`rejected`): counted in the transaction that stores them, kept by a
purge, taken back by a redrive; in `edgepipe stats`, `GET /v1/stats`, the CLI, the 0002
migration's backfill and the retention purge. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from consumers.traffic import TrafficConsumer
from pipeline import clock, meta, migrate
from pipeline.bindings.db import Database
from pipeline.bindings.queue import DeadReason, MessageBatch
from pipeline.bindings.queue_sql import SqlQueue
from pipeline.dlq import purge_expired_letters
from pipeline.env import Env
from pipeline.errors import ValidationError
from pipeline.http.app import create_app
from pipeline.schema import queue_dlq
from pipeline.worker import Worker
from tests.conftest import MakeEnv, run_cli
from tests.faults import NOW, NOW_MS, FaultyHandler, refuse_id
from tests.http_support import client_for

HOUR_S = 3600
DAY_S = 86_400
ZERO = {"invalid": 0, "too_late": 0, "poison": 0, "retries_exhausted": 0}


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time(NOW) as f:
        yield f


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def dead_letter(env: Env, *reasons: str) -> list[str]:
    """One message per reason, dead-lettered with it now (through receive / settle);
    returns their ids in order."""
    ids = env.QUEUE.send_batch([{"n": i, "reason": r} for i, r in enumerate(reasons)])
    batch = env.QUEUE.receive(len(ids), 0)
    for m in batch:
        m.dead_letter(m.body["reason"], f"because {m.body['n']}")
    env.QUEUE.settle(batch)
    return ids


def listed(env: Env, **filters: Any) -> list[str]:
    return [d["message_id"] for d in env.QUEUE.dlq_list(limit=1000, **filters)]


def event(id_: str, **over: Any) -> dict[str, Any]:
    ev = {"id": id_, "ts": NOW_MS - 1000, "method": "GET", "path": "/x", "status": 200, "response_time_ms": 5}
    return {k: v for k, v in (ev | over).items() if v is not ...}


def drain(env: Env, handler: Any = None) -> None:
    worker = Worker(env, handler or TrafficConsumer(env.config).handle_batch)
    while worker.step(wait=0) is not None:
        pass
    worker.ctx.close()


# -- list / redrive / purge by reason and age ---------------------------------------------


def test_list_filters_by_reason_and_before(env: Env, frozen: FrozenDateTimeFactory) -> None:
    early = dead_letter(env, "invalid", "too_late", "invalid")
    frozen.tick(HOUR_S)
    late = dead_letter(env, "poison", "invalid")
    t_late = clock.now_s()

    assert listed(env) == early + late
    assert listed(env, reason="invalid") == [early[0], early[2], late[1]]
    assert listed(env, reason=DeadReason.POISON) == [late[0]]
    assert listed(env, before=t_late) == early
    assert listed(env, before=t_late - HOUR_S) == []  # strictly older: not the letters failed at that second
    assert listed(env, reason="invalid", before=t_late) == [early[0], early[2]]
    assert listed(env, reason="poison", before=t_late) == []
    assert listed(env, reason="retries_exhausted") == []
    assert [d["message_id"] for d in env.QUEUE.dlq_list(limit=1, reason="invalid")] == [early[0]]


def test_redrive_filters_by_reason_and_before(env: Env, frozen: FrozenDateTimeFactory) -> None:
    early = dead_letter(env, "invalid", "too_late", "invalid")
    frozen.tick(HOUR_S)
    late = dead_letter(env, "invalid", "poison")
    t_late = clock.now_s()

    assert env.QUEUE.dlq_redrive(reason="invalid", before=t_late, limit=1) == 1  # the oldest match
    assert listed(env) == [early[1], early[2], *late]
    assert env.QUEUE.dlq_redrive(reason="invalid", before=t_late) == 1
    assert env.QUEUE.dlq_redrive(reason="invalid", before=t_late) == 0
    assert env.QUEUE.dlq_redrive(before=t_late) == 1  # the too_late letter
    assert listed(env) == late
    assert env.QUEUE.dlq_redrive(reason="poison") == 1
    assert listed(env) == [late[0]]
    again = env.QUEUE.receive(100, 0)
    assert [m.id for m in again] == [early[0], early[2], early[1], late[1]]  # redriven in DLQ order
    assert all(m.attempts == 1 for m in again)


def test_purge_filters_by_reason_and_before(env: Env, frozen: FrozenDateTimeFactory) -> None:
    early = dead_letter(env, "invalid", "too_late", "invalid")
    frozen.tick(HOUR_S)
    late = dead_letter(env, "invalid", "too_late")
    t_late = clock.now_s()

    assert env.QUEUE.dlq_purge(reason="too_late", before=t_late) == 1
    assert listed(env) == [early[0], early[2], *late]
    assert env.QUEUE.dlq_purge(before=t_late) == 2
    assert listed(env) == late
    assert env.QUEUE.dlq_purge(reason="invalid") == 1
    assert listed(env) == [late[1]]
    assert env.QUEUE.stats()["pending"] == 0  # purged, not redriven
    assert env.QUEUE.dlq_purge() == 1  # no filter: every letter of the queue
    assert env.QUEUE.dlq_purge() == 0 and listed(env) == []


def test_a_reason_outside_dead_reason_is_refused(env: Env) -> None:
    dead_letter(env, "invalid")
    for call in (
        lambda: env.QUEUE.dlq_list(reason="bogus"),
        lambda: env.QUEUE.dlq_redrive(reason="Invalid"),
        lambda: env.QUEUE.dlq_purge(reason="retries"),
    ):
        with pytest.raises(ValidationError, match="not a dead-letter reason") as exc:
            call()
        assert exc.value.field == "reason"
    assert len(listed(env)) == 1 and env.QUEUE.rejected_totals()["invalid"] == 1


def test_filters_touch_only_this_queue(env: Env) -> None:
    other = SqlQueue(env.DB, "other")
    extended = SqlQueue(env.DB, "events.x")  # its counters share the prefix "dlq_total.events."
    for q in (other, extended):
        q.send({"n": 1})
        batch = q.receive(1, 0)
        batch.messages[0].dead_letter("invalid")
        q.settle(batch)
    mine = dead_letter(env, "invalid")
    assert listed(env) == mine
    assert env.QUEUE.rejected_totals() == ZERO | {"invalid": 1}
    assert env.QUEUE.dlq_purge() == 1
    assert other.dlq_list() != [] and other.rejected_totals() == ZERO | {"invalid": 1}
    assert env.QUEUE.dlq_redrive() == 0 and other.dlq_redrive() == 1
    assert other.rejected_totals() == ZERO and extended.rejected_totals() == ZERO | {"invalid": 1}


# -- lasting counts -----------------------------------------------------------------------


def test_rejected_counts_letters_from_the_real_consumer(db_url: str, make_env: MakeEnv) -> None:
    """invalid, too_late (whole messages and array elements) and poison, through the worker,
    with a failed first attempt: each letter is counted once, in its own transaction."""
    with freeze_time(NOW):
        env = make_env(db_url, consumer={"max_batch_size": 100})
        watermark = NOW_MS - 2 * HOUR_S * 1000
        with env.DB.transaction() as conn:
            meta.put(env.DB, conn, meta.ARCHIVE_WATERMARK_MS, str(watermark))
        late = watermark - 1000
        env.QUEUE.send_batch([
            event("ok-1"), event("bad-status", status=999), event("stale", ts=late), event("poison"),
            [event("a0"), event("a1", method=5), event("a2", ts=late), event("a3")],
            event("ok-2"), event("no-path", path=...),
        ])  # fmt: skip
        refuse_id(env, "poison")
        drain(env, FaultyHandler(env.config, fail={0}, crash=set()))  # the first attempt rolls back

        expected = {"invalid": 3, "too_late": 2, "poison": 1, "retries_exhausted": 0}
        assert env.QUEUE.rejected_totals() == expected
        assert env.QUEUE.dlq_counts() == {k: v for k, v in expected.items() if v}  # as many as the DLQ holds
        assert env.QUEUE.stats()["pending"] == 0

        assert env.QUEUE.dlq_purge(reason="invalid") == 3
        assert env.QUEUE.rejected_totals() == expected  # a purge keeps the count
        assert env.QUEUE.dlq_redrive(reason="too_late") == 2
        assert env.QUEUE.rejected_totals() == expected | {"too_late": 0}  # redriven: no longer failures
        drain(env)  # still older than the watermark: dead again, counted again
        assert env.QUEUE.rejected_totals() == expected
        assert env.QUEUE.dlq_purge() == 3
        assert env.QUEUE.dlq_list() == []
        assert env.QUEUE.rejected_totals() == expected  # the counts survive a purge of all


def test_retries_exhausted_are_counted(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_retries": 1})
    env.QUEUE.send_batch([{"n": 1}, {"n": 2}])
    for _ in range(2):
        batch = env.QUEUE.receive(10, 0)
        env.QUEUE.settle(batch, failure="boom")
    assert listed(env, reason="retries_exhausted") and env.QUEUE.stats()["pending"] == 0
    assert env.QUEUE.rejected_totals() == ZERO | {"retries_exhausted": 2}


def test_counts_roll_back_with_the_letters(env: Env) -> None:
    """The count is written in the transaction that stores the letters: a batch whose
    transaction rolls back counts nothing."""

    class Abort(Exception):
        pass

    env.QUEUE.send_batch([{"n": 1}, [{"n": 2}, {"n": 3}]])
    with pytest.raises(Abort), env.DB.transaction():
        batch: MessageBatch = env.QUEUE.receive(10, 0)
        batch.messages[0].dead_letter("invalid", "x")
        batch.messages[1].dead_letter_part(1, "too_late", "y")
        env.QUEUE.settle(batch)
        assert env.QUEUE.rejected_totals() == ZERO | {"invalid": 1, "too_late": 1}  # seen inside it
        raise Abort
    assert env.QUEUE.rejected_totals() == ZERO
    assert env.QUEUE.dlq_list() == [] and env.QUEUE.stats()["pending"] == 2


def test_redrive_never_counts_below_zero(env: Env) -> None:
    """Letters stored without a count (a worker of the previous release writing during the
    upgrade) are redriven without driving the count negative."""
    dead_letter(env, "invalid")
    with env.DB.transaction() as conn:
        row = conn.execute(sa.select(queue_dlq).where(queue_dlq.c.queue == "events")).mappings().one()
        conn.execute(queue_dlq.insert(), [{k: v for k, v in row.items() if k != "seq"} | {"message_id": "m2"}])
    assert env.QUEUE.dlq_redrive() == 2
    assert env.QUEUE.rejected_totals() == ZERO


# -- the 0002 backfill --------------------------------------------------------------------


def test_the_migration_counts_the_letters_already_in_the_dlq(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert migrate.upgrade(db, "0001") == "0001"
        letter = {"content_type": "json", "body": b"{}", "enqueued_at": 1.0, "failed_at": 2.0, "attempts": 1,
                  "error": "e"}  # fmt: skip
        rows = [("events", "invalid")] * 3 + [
            ("events", "poison"),
            ("events", "retries_exhausted"),
            ("other", "poison"),
        ]
        with db.transaction() as conn:
            conn.execute(
                queue_dlq.insert(),
                [letter | {"queue": q, "reason": r, "message_id": f"m{i}"} for i, (q, r) in enumerate(rows)],
            )
        assert migrate.upgrade(db) == migrate.HEAD_REVISION
        events, other = SqlQueue(db, "events"), SqlQueue(db, "other")
        assert events.rejected_totals() == ZERO | {"invalid": 3, "poison": 1, "retries_exhausted": 1}
        assert other.rejected_totals() == ZERO | {"poison": 1}
        assert events.dlq_redrive(reason="invalid", limit=1) == 1  # backfilled counts move like the others
        assert events.rejected_totals()["invalid"] == 2
    finally:
        db.dispose()


# -- retention ----------------------------------------------------------------------------


def test_purge_expired_letters(db_url: str, make_env: MakeEnv, frozen: FrozenDateTimeFactory) -> None:
    env = make_env(db_url)  # dlq_retention_days 14 by default
    t0 = clock.now_s()
    dead_letter(env, "invalid", "poison")
    frozen.tick(2 * DAY_S)
    young = dead_letter(env, "too_late")
    assert purge_expired_letters(env, t0 + 13.5 * DAY_S) == 0
    assert purge_expired_letters(env, t0 + 14 * DAY_S) == 0  # exactly 14 days old: kept
    assert purge_expired_letters(env, t0 + 15 * DAY_S) == 2
    assert listed(env) == young
    assert env.QUEUE.rejected_totals() == {"invalid": 1, "too_late": 1, "poison": 1, "retries_exhausted": 0}


def test_the_clean_job_purges_expired_letters(db_url: str, make_env: MakeEnv, frozen: FrozenDateTimeFactory) -> None:
    from pipeline.cli.compose import register_jobs
    from scheduler.runner import run_by_hand

    register_jobs()
    env = make_env(db_url)
    dead_letter(env, "invalid")
    frozen.tick(10 * DAY_S)
    young = dead_letter(env, "poison")
    frozen.tick(5 * DAY_S)  # the first letter is 15 days old, the second 5
    out = run_by_hand(env, "clean", None)
    assert out.status == "succeeded" and out.result is not None and out.result["dlq_purged"] == 1
    assert listed(env) == young
    assert env.QUEUE.rejected_totals()["invalid"] == 1


def test_retention_zero_keeps_letters_forever(db_url: str, make_env: MakeEnv, frozen: FrozenDateTimeFactory) -> None:
    env = make_env(db_url, consumer={"dlq_retention_days": 0})
    ids = dead_letter(env, "invalid")
    assert purge_expired_letters(env, clock.now_s() + 10_000 * 86_400) == 0
    assert listed(env) == ids


# -- CLI and HTTP -------------------------------------------------------------------------


def test_cli_list_redrive_purge_with_filters(env: Env, frozen: FrozenDateTimeFactory) -> None:
    early = dead_letter(env, "invalid", "too_late")
    frozen.tick(HOUR_S)
    late = dead_letter(env, "invalid", "poison")
    cut = clock.iso(clock.now_s())

    def json_of(*args: str) -> Any:
        result = run_cli(env, *args, "--json")
        assert result.exit_code == 0, result.output
        return orjson.loads(result.stdout)

    assert [d["message_id"] for d in json_of("queue", "dlq", "list", "--reason", "invalid")] == [early[0], late[0]]
    assert [d["message_id"] for d in json_of("queue", "dlq", "list", "--before", cut)] == early
    assert [d["message_id"] for d in json_of("queue", "dlq", "list", "--limit", "1", "--before", cut)] == early[:1]
    assert json_of("queue", "dlq", "purge", "--reason", "invalid", "--before", cut) == {"purged": 1}
    assert json_of("queue", "dlq", "redrive", "--reason", "poison") == {"redriven": 1}
    text = run_cli(env, "queue", "dlq", "purge", "--before", str(int(clock.now_s())))
    assert text.exit_code == 0 and "purged 1 dead letters" in text.stderr
    assert json_of("queue", "dlq", "redrive", "--limit", "5") == {"redriven": 1}
    assert json_of("queue", "dlq", "purge") == {"purged": 0}
    stats = json_of("stats")  # purged letters still count; redriven ones (poison, late[0]) no longer
    assert stats["rejected"] == {"invalid": 1, "too_late": 1, "poison": 0, "retries_exhausted": 0}
    assert {"hot", "cold", "total"} <= set(stats)
    plain = run_cli(env, "stats")
    assert plain.exit_code == 0
    assert "rejected invalid 1, too_late 1, poison 0, retries_exhausted 0" in " ".join(plain.stdout.split())


@pytest.mark.parametrize("command", ["list", "redrive", "purge"])
def test_cli_bad_reason_or_before_exits_3(env: Env, command: str) -> None:
    dead_letter(env, "invalid")
    for args, named in ((("--reason", "bogus"), "--reason"), (("--before", "last tuesday"), "--before")):
        result = run_cli(env, "queue", "dlq", command, *args)
        assert result.exit_code == 3, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"edgepipe: {named}: ")
    assert (
        "invalid, too_late, poison, retries_exhausted" in run_cli(env, "queue", "dlq", command, "--reason", "x").stderr
    )
    assert len(listed(env)) == 1  # nothing touched


def test_cli_help_names_every_reason() -> None:
    from pipeline.cli.core import REASONS

    assert ", ".join(r.value for r in DeadReason) == REASONS


@pytest.mark.anyio
async def test_http_stats_has_rejected(env: Env) -> None:
    dead_letter(env, "poison", "poison", "invalid")
    env.QUEUE.dlq_purge(reason="poison")
    async with client_for(create_app(env)) as c:
        stats = (await c.get("/v1/stats")).json()
    assert stats["rejected"] == ZERO | {"poison": 2, "invalid": 1}
    assert stats["queue"]["dlq"] == 1
