"""The audit log: every audited command leaves exactly one row with the right actor,
action, parameters and outcome (DLQ redrive and purge on every queue backend, replay
restore / drop-restored / rebuild, manual job runs), in the transaction of the action
where its writes are in the database (a failure rolls both back and leaves one `failed`
row); the worker's `config.loaded` row and its digest; retention by the `clean` job under
a frozen clock; and `edgepipe audit` with its filters. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

import archiver.replay
from pipeline import audit, clock, config
from pipeline.bindings.queue_sql import SqlQueue
from pipeline.cli.compose import worker_process
from pipeline.env import Env
from pipeline.jobruns import JobStore
from pipeline.jobs import JOBS
from pipeline.schema import audit_log
from scheduler.runner import execute
from tests.archive_support import consume, event, hot_ids, ms, run_job
from tests.conftest import MakeEnv, run_cli

NOW = "2026-11-22T02:00:00Z"
FROM, TO = "2026-11-17T00:00:00Z", "2026-11-20T00:00:00Z"
ME = audit.cli_actor().name
DAY_S = 86_400


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time(NOW) as f:
        yield f


def rows(env: Env) -> list[dict[str, Any]]:
    return audit.entries(env.DB, limit=100_000)


def the_row(env: Env, before: int) -> dict[str, Any]:
    """The one row an invocation added to the `before` rows there were (fails on 0 or 2)."""
    found = rows(env)
    assert len(found) == before + 1, found[before:]
    return found[-1]


def cli(env: Env, *args: str, code: int = 0, environ: dict[str, str] | None = None) -> Any:
    result = run_cli(env, *args, environ=environ)
    assert result.exit_code == code, result.output
    return result


def dead_letter(env: Env, *reasons: str) -> list[str]:
    """One message per reason, dead-lettered with it now; their ids."""
    ids = env.QUEUE.send_batch([{"n": i, "reason": r} for i, r in enumerate(reasons)])
    batch = env.QUEUE.receive(len(ids), 0)
    for m in batch:
        m.dead_letter(m.body["reason"], "because")
    env.QUEUE.settle(batch)
    return ids


def dlq_ids(env: Env) -> list[str]:
    return [d["message_id"] for d in env.QUEUE.dlq_list(limit=1000)]


# -- DLQ ----------------------------------------------------------------------------------


def test_dlq_redrive_and_purge_leave_one_row_each_on_every_queue(qenv: Env) -> None:
    """Same transaction on the `db` queue, right after the effect on SQS and Redis: either
    way one row per invocation, actor `cli:<user>`, filters and counts in params."""
    on_queue = {"EDGEPIPE_BINDINGS__QUEUE": qenv.config.bindings.queue}
    dead_letter(qenv, "poison", "invalid", "invalid")
    out = cli(qenv, "queue", "dlq", "redrive", "--reason", "poison", "--json", environ=on_queue)
    assert orjson.loads(out.stdout) == {"redriven": 1}
    row = the_row(qenv, 0)
    assert (row["actor"], row["action"], row["outcome"], row["detail"]) == (ME, "dlq.redrive", "ok", "")
    assert row["params"] == {"limit": None, "reason": "poison", "before": None, "redriven": 1}
    assert row["token_id"] is None and row["client"] is None

    cut = clock.now_s() + 60
    out = cli(qenv, "queue", "dlq", "purge", "--before", str(cut), "--json", environ=on_queue)
    assert orjson.loads(out.stdout) == {"purged": 2}
    row = the_row(qenv, 1)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "dlq.purge", "ok")
    assert row["params"] == {"reason": None, "before": clock.iso(cut), "purged": 2}

    cli(qenv, "queue", "dlq", "purge", environ=on_queue)  # nothing left: still one row, purged 0
    assert the_row(qenv, 2)["params"]["purged"] == 0
    cli(qenv, "queue", "dlq", "list", environ=on_queue)  # reading is not audited
    cli(qenv, "queue", "dlq", "purge", "--reason", "bogus", code=3, environ=on_queue)  # refused before it starts
    assert len(rows(qenv)) == 3


def test_a_failed_redrive_rolls_back_with_its_row_and_leaves_one_failed_row(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = dead_letter(env, "poison", "poison")
    redrive = SqlQueue.dlq_redrive

    def redrive_then_fail(self: SqlQueue, *args: Any, **kwargs: Any) -> int:
        redrive(self, *args, **kwargs)  # the letters are back on the queue, uncommitted
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SqlQueue, "dlq_redrive", redrive_then_fail)
    result = cli(env, "queue", "dlq", "redrive", "--limit", "5", code=1)
    assert "disk on fire" in result.stderr
    row = the_row(env, 0)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "dlq.redrive", "failed")
    assert row["detail"] == "RuntimeError: disk on fire"
    assert row["params"] == {"limit": 5, "reason": None, "before": None}  # no count: nothing was redriven
    assert sorted(dlq_ids(env)) == sorted(ids) and env.QUEUE.rejected_totals()["poison"] == 2


# -- replay -------------------------------------------------------------------------------


def _archived(env: Env) -> None:
    """60 events every 30 min from 2026-11-17T20:00, archived and cleaned out of the DB."""
    consume(env, [event(i, ms("2026-11-17T20:00:00Z") + i * 1_800_000) for i in range(60)])
    run_job(env, "archive", NOW)
    run_job(env, "clean", NOW)
    assert hot_ids(env) == []


def test_replay_restore_drop_restored_and_rebuild_leave_one_row_each(
    make_env: MakeEnv, db_url: str, tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    env = make_env(db_url)
    _archived(env)
    span = {"from": FROM, "to": TO}

    out = orjson.loads(cli(env, "replay", "restore", "--from", FROM, "--to", TO, "--json").stdout)
    assert out["inserted"] == 60
    row = the_row(env, 0)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "replay.restore", "ok")
    assert row["params"] == span | {"objects": out["objects"], "rows": 60, "inserted": 60, "bad": 0}
    assert row["at"] == NOW

    out = orjson.loads(cli(env, "replay", "drop-restored", "--from", FROM, "--to", TO, "--json").stdout)
    assert out["deleted"] == 60
    row = the_row(env, 1)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "replay.drop_restored", "ok")
    assert row["params"] == span | {"deleted": 60, "bad": 0}

    into = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    out = orjson.loads(cli(env, "replay", "rebuild", "--from", FROM, "--to", TO, "--into", into, "--json").stdout)
    row = the_row(env, 2)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "replay.rebuild", "ok")
    assert row["params"] == span | {
        "into": into, "objects": out["objects"], "rows": 60, "hourly_rows": out["hourly_rows"], "bad": 0
    }  # fmt: skip
    assert out["hourly_rows"] > 0

    cli(env, "replay", "rebuild", "--from", FROM, "--to", TO, "--into", into, code=3)  # the target is not fresh
    row = the_row(env, 3)
    assert (row["action"], row["outcome"]) == ("replay.rebuild", "failed")
    assert "ValidationError" in row["detail"] and "fresh database" in row["detail"]
    cli(env, "replay", "drop-restored", "--from", TO, "--to", FROM, code=3)  # an empty range: refused, no row
    cli(env, "replay", "list", "--json")  # reading is not audited
    assert len(rows(env)) == 4


def test_a_failed_restore_leaves_one_failed_row_and_can_be_run_again(
    make_env: MakeEnv, db_url: str, monkeypatch: pytest.MonkeyPatch, frozen: FrozenDateTimeFactory
) -> None:
    """A restore commits batch by batch (workers keep consuming meanwhile): an error after
    the rows were inserted leaves one `failed` row; running it again finishes the job and
    inserts nothing twice."""
    env = make_env(db_url)
    _archived(env)

    def broken(*_args: Any) -> list[int]:
        raise RuntimeError("lost the database half-way")

    with monkeypatch.context() as patch:
        patch.setattr(archiver.replay, "expired_hours", broken)  # called after the inserts
        cli(env, "replay", "restore", "--from", FROM, "--to", TO, code=1)
    row = the_row(env, 0)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "replay.restore", "failed")
    assert row["detail"] == "RuntimeError: lost the database half-way"
    restored = hot_ids(env, (2,))
    again = orjson.loads(cli(env, "replay", "restore", "--from", FROM, "--to", TO, "--json").stdout)
    assert again["inserted"] == 0 and hot_ids(env, (2,)) == restored
    assert the_row(env, 1)["outcome"] == "ok"


def test_a_restore_that_skips_a_corrupt_object_is_partial(
    make_env: MakeEnv, db_url: str, frozen: FrozenDateTimeFactory
) -> None:
    env = make_env(db_url)
    _archived(env)
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    keys = [k for k, _h, _s in archiver.replay.objects_in(store, prefix, clock.parse_time(FROM), clock.parse_time(TO))]
    store.put_bytes(keys[0], store.get_bytes(keys[0])[:-20], store.head(keys[0]).metadata)
    out = orjson.loads(cli(env, "replay", "restore", "--from", FROM, "--to", TO, "--json", code=6).stdout)
    row = the_row(env, 0)
    assert (row["action"], row["outcome"], row["detail"]) == (
        "replay.restore",
        "partial",
        f"skipped corrupt objects: {keys[0]}",
    )
    assert row["params"]["bad"] == 1 and row["params"]["inserted"] == out["inserted"] > 0
    assert len(hot_ids(env, (2,))) == out["inserted"]  # the sound objects' rows committed


# -- jobs ---------------------------------------------------------------------------------


def test_manual_job_runs_leave_one_row_each_and_scheduled_runs_none(
    env: Env, monkeypatch: pytest.MonkeyPatch, frozen: FrozenDateTimeFactory
) -> None:
    cli(env, "jobs", "run", "rollup", "--json")
    row = the_row(env, 0)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "jobs.run", "ok")
    assert row["params"] == {
        "job": "rollup", "at": None, "dry_run": False, "status": "succeeded", "attempt": 1, "scheduled_for": NOW
    }  # fmt: skip

    cli(env, "jobs", "run", "rollup", "--at", "2026-11-21T00:15:00Z", "--dry-run")
    row = the_row(env, 1)
    assert (row["params"]["at"], row["params"]["dry_run"], row["params"]["status"]) == (
        "2026-11-21T00:15:00Z",
        True,
        "dry_run",
    )

    def boom(env: Env, slot: datetime, dry_run: bool) -> dict[str, Any]:
        raise RuntimeError("rollup exploded")

    monkeypatch.setitem(JOBS, "rollup", boom)
    assert "rollup exploded" in cli(env, "jobs", "run", "rollup", code=1).stderr
    row = the_row(env, 2)
    assert (row["actor"], row["action"], row["outcome"]) == (ME, "jobs.run", "failed")
    assert row["detail"] == "RuntimeError: rollup exploded" and row["params"]["status"] == "failed"

    JobStore(env.DB).acquire("rollup", "busy-worker", 300)  # another process runs it: refused, exit 4
    cli(env, "jobs", "run", "rollup", code=4)
    row = the_row(env, 3)
    assert (row["action"], row["outcome"]) == ("jobs.run", "failed") and "busy-worker" in row["detail"]
    JobStore(env.DB).release("rollup", "busy-worker")

    monkeypatch.setitem(JOBS, "rollup", lambda env, slot, dry_run: {"ok": True})
    assert execute(env, JobStore(env.DB), "rollup", clock.now(), "scheduler").status == "succeeded"
    assert len(rows(env)) == 4  # what the scheduler runs is in job_runs, not in the audit log


# -- the worker's configuration ------------------------------------------------------------


def test_worker_start_records_the_configuration_it_runs_with(env: Env) -> None:
    process = worker_process(env, with_scheduler=False)
    process.request_stop()  # run() starts, records, and returns at once
    assert process.run() == 0
    (row,) = rows(env)
    assert (row["actor"], row["action"], row["outcome"]) == ("system", "config.loaded", "ok")
    assert row["params"] == {
        "command": "worker", "source": env.config.source, "sha256": audit.config_digest(env.config),
        "holder": process.holder,
    }  # fmt: skip
    assert len(row["params"]["sha256"]) == 64


def test_config_digest_is_of_the_settings_not_of_how_they_were_written(tmp_path: Path) -> None:
    one, two, three = tmp_path / "one.toml", tmp_path / "two.toml", tmp_path / "three.toml"
    one.write_text("[consumer]\nmax_retries = 5\nretry_delay = 2\n[audit]\nretention_days = 30\n")
    two.write_text("[audit]\nretention_days = 30\n[consumer]\nretry_delay = 2.0\nmax_retries = 5\n")
    three.write_text("[consumer]\nmax_retries = 6\nretry_delay = 2\n[audit]\nretention_days = 30\n")
    digest = audit.config_digest(config.load(one, environ={}))
    assert audit.config_digest(config.load(two, environ={})) == digest  # other key order, other source
    assert audit.config_digest(config.load(three, environ={})) != digest
    overridden = config.load(three, environ={"EDGEPIPE_CONSUMER__MAX_RETRIES": "5"})
    assert audit.config_digest(overridden) == digest
    assert audit.config_digest(config.Config()) == audit.config_digest(config.load(None, environ={}))


def test_public_url_hides_a_password() -> None:
    assert (
        audit.public_url("postgresql+psycopg://ops:s3cret@db:5432/edge") == "postgresql+psycopg://ops:***@db:5432/edge"
    )
    assert audit.public_url("sqlite:///data/rebuilt.db") == "sqlite:///data/rebuilt.db"


# -- retention ----------------------------------------------------------------------------


def _rows_at(env: Env, frozen: FrozenDateTimeFactory, *days: float) -> None:
    """One row `day.<n>` at each of `days` (days after NOW, in order)."""
    start = clock.now_s()
    for d in days:
        frozen.move_to(datetime.fromtimestamp(start + d * DAY_S, UTC))
        with env.DB.transaction() as conn:
            audit.record(env.DB, conn, audit.SYSTEM, f"day.{d:g}")


def test_clean_job_deletes_exactly_the_rows_past_retention(
    make_env: MakeEnv, db_url: str, frozen: FrozenDateTimeFactory
) -> None:
    env = make_env(db_url, audit={"retention_days": 30})
    _rows_at(env, frozen, 0, 9.5, 10, 30)
    frozen.move_to(datetime.fromtimestamp(clock.parse_time(NOW) + 40 * DAY_S, UTC))  # cutoff: day 10
    thirty = {"EDGEPIPE_AUDIT__RETENTION_DAYS": "30"}  # the command reads its own configuration
    out = orjson.loads(cli(env, "jobs", "run", "clean", "--json", environ=thirty).stdout)
    assert out["audit_purged"] == 2 and out["dlq_purged"] == 0
    assert [r["action"] for r in rows(env)] == ["day.10", "day.30", "jobs.run"]  # day 10: at the cutoff, kept
    dry = orjson.loads(cli(env, "jobs", "run", "clean", "--dry-run", "--json", environ=thirty).stdout)
    assert "audit_purged" not in dry


def test_default_retention_is_a_year_and_zero_keeps_every_row(
    make_env: MakeEnv, db_url: str, frozen: FrozenDateTimeFactory
) -> None:
    env = make_env(db_url)
    assert env.config.audit.retention_days == 365
    _rows_at(env, frozen, 0, 34.5, 35.5)
    frozen.tick(364.5 * DAY_S)  # day 400: the rows before day 35 are older than a year
    assert run_job(env, "clean", clock.iso(clock.now_s()))["audit_purged"] == 2
    assert [r["action"] for r in rows(env)] == ["day.35.5"]
    assert audit.purge_expired(env.DB, 0, clock.now_s() + 100 * 365 * DAY_S) == 0
    assert len(rows(env)) == 1


# -- edgepipe audit -------------------------------------------------------------------------


def test_audit_command_filters_by_time_action_and_limit(env: Env, frozen: FrozenDateTimeFactory) -> None:
    _rows_at(env, frozen, 0, 1, 2, 3)
    day = [clock.iso(clock.parse_time(NOW) + d * DAY_S) for d in range(4)]

    def listed(*args: str) -> list[str]:
        out = orjson.loads(cli(env, "audit", *args, "--json").stdout)
        return [r["action"] for r in out]

    assert listed() == ["day.0", "day.1", "day.2", "day.3"]
    assert listed("--since", day[2]) == ["day.2", "day.3"]
    assert listed("--since", day[1], "--until", day[3]) == ["day.1", "day.2"]
    assert listed("--until", "2026-11-23") == ["day.0"]  # a date
    assert listed("--action", "day.1") == ["day.1"]
    assert listed("--limit", "2") == ["day.2", "day.3"]  # the newest, oldest first
    (first,) = orjson.loads(cli(env, "audit", "--until", day[1], "--json").stdout)
    assert set(first) == {"seq", "at", "actor", "token_id", "action", "params", "outcome", "detail", "client"}
    assert (first["at"], first["actor"], first["params"]) == (NOW, "system", {})

    table = cli(env, "audit", "--since", day[3]).stdout
    assert "day.3" in table and "day.2" not in table and "system" in table
    assert cli(env, "audit", "--since", "yesterday-ish", code=3).stderr.startswith("edgepipe: --since: ")
    assert cli(env, "audit", "--since", day[2], "--until", day[1], code=3).stderr.startswith("edgepipe: --until: ")
    assert len(rows(env)) == 4  # reading the log is not audited


def test_rows_are_in_the_audit_log_table(env: Env) -> None:
    with audit.action(env.DB, audit.cli_actor(), "probe", {"n": 1}) as result:
        result["m"] = 2
    with env.DB.read() as conn:
        (row,) = conn.execute(sa.select(audit_log)).all()
    assert (row.actor, row.action, orjson.loads(row.params), row.outcome) == (ME, "probe", {"n": 1, "m": 2}, "ok")
