"""`edgepipe demo` at small scale, on SQLite and PostgreSQL: the simulated deployment holds
exactly the unique events sent, passes `verify`, ran each cron job once per slot of the
simulated days, and never held detail rows spanning more than detail_days + 1 days."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline import clock
from pipeline.cron import parse_table
from pipeline.schema import job_runs, worker_heartbeats
from tests.conftest import run_cli

END = "2026-11-20T12:00:00Z"


def _slots(config: Any, start_s: float, end_s: float) -> dict[str, list[float]]:
    out = {}
    for spec in parse_table(config.schedule.jobs, config.schedule.timezone):
        fire = spec.next_fire(datetime.fromtimestamp(start_s - 1, UTC))
        slots = []
        while fire is not None and fire.timestamp() <= end_s:
            slots.append(fire.timestamp())
            fire = spec.next_fire(fire)
        out[spec.name] = slots
    return out


def _demo(env: Any, *args: str) -> Any:
    from pipeline.cli import State
    from pipeline.cli.demo import run_demo

    state = State(None, None)
    state.config = env.config  # type: ignore[misc]  (the fixture's bindings, as `--config` would)
    return run_demo(state, *args)  # type: ignore[arg-type]


def test_demo_four_days(env: Any) -> None:
    end_s = clock.parse_time(END)
    r = _demo(env, 4, 0.2, 3, False, False, end_s)
    assert r["days"] == 4 and r["end"] == END and r["start"] == "2026-11-16T12:00:00Z"
    assert r["exact"] and r["verify_ok"], r["problems"]
    assert r["total_events"] == r["unique_events"] == r["hot_events"] + r["cold_events"]
    assert r["cold_events"] > 0  # the archive and clean jobs ran on simulated days
    assert r["events_sent"] == r["unique_events"] + r["duplicates_sent"] + r["invalid_sent"] + r["too_late_sent"]
    assert 0.15 < r["duplicates_sent"] / r["unique_events"] < 0.25
    assert r["dlq"] == {k: v for k, v in (("invalid", r["invalid_sent"]), ("too_late", r["too_late_sent"])) if v}
    assert r["max_hot_span_days"] <= env.config.retention.detail_days + 1 + 1 / 24
    assert 0 < r["max_hot_events"] < r["unique_events"]
    expected = _slots(env.config, clock.parse_time(r["start"]), end_s)
    with env.DB.read() as conn:
        runs = conn.execute(sa.select(job_runs.c.job, job_runs.c.scheduled_for, job_runs.c.status)).all()
        workers = conn.execute(sa.select(sa.func.count()).select_from(worker_heartbeats)).scalar_one()
    assert {(job, status) for job, _, status in runs} <= {(job, "succeeded") for job in expected}
    for job, slots in expected.items():
        assert sorted(s for j, s, _ in runs if j == job) == slots, job  # once per slot, every slot
    assert r["job_runs"] == {job: len(slots) for job, slots in expected.items() if slots}
    assert {"archive", "clean", "monitor"} <= set(r["job_runs"])
    assert workers == 0  # the demo's stand-in worker leaves no heartbeat behind


def test_demo_refuses_a_database_with_events_unless_forced(env: Any) -> None:
    end_s = clock.parse_time(END)
    first = _demo(env, 1, 0.02, 1, False, False, end_s)
    assert first["exact"]
    result = run_cli(env, "demo", "--days", "1", "--rate", "0.02", "--json")
    assert result.exit_code == 3 and "already holds" in result.stderr
    forced = run_cli(env, "--log-level", "ERROR", "demo", "--days", "1", "--rate", "0.02", "--seed", "2", "--force",
                     "--json")  # fmt: skip
    assert forced.exit_code == 0, forced.output
    summary = orjson.loads(forced.stdout)
    assert summary["exact"] and summary["verify_ok"]
    assert summary["total_events"] == first["total_events"] + summary["unique_events"]
