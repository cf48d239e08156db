"""`edgepipe jobs …`: the cron table, run history, and runs by hand; `edgepipe watermark …`:
the archive watermark the archive job raises, inspected and repaired.

A run by hand goes through the scheduler's own path: it takes the job's lease (refusing
while another process runs the job) and is recorded in `job_runs` like a scheduled run.
It is also audited (`jobs.run`), right after it ends: a job is many transactions and
objects in the bucket, not one transaction the audit row could join.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

from pipeline import clock
from pipeline.cli import State, emit_json, main, pass_state, print_table, time_option


@main.group()
def jobs() -> None:
    """Scheduled jobs: archive, clean, monitor, rollup, expire, backup, snapshot_prune."""


@jobs.command("run")
@click.argument("name")
@click.option("--at", "at", metavar="T", help="Scheduled time of the run (RFC 3339); default now.")
@click.option("--dry-run", is_flag=True, help="Report what would be done, change nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def jobs_run(state: State, name: str, at: str | None, dry_run: bool, as_json: bool) -> None:
    """Run job NAME once, now, as if scheduled at T (recorded in the job history).
    T may not be more than 60 s in the future (exit 3). Exits 1 when the job fails, 4
    while another process runs it."""
    from pipeline import audit
    from scheduler.runner import run_by_hand

    at_s = time_option(at, "--at")
    when = None if at_s is None else datetime.fromtimestamp(at_s, UTC)
    env = state.env()
    params = {"job": name, "at": None if at_s is None else clock.iso(at_s), "dry_run": dry_run}
    with audit.action(env.DB, audit.cli_actor(), "jobs.run", params, same_transaction=False) as done:
        out = run_by_hand(env, name, when, dry_run)
        done.update(status=out.status, attempt=out.attempt, scheduled_for=clock.iso(out.scheduled_for.timestamp()))
        if out.status == "failed":
            done.outcome, done.detail = audit.Outcome.FAILED, out.error or ""
    if out.status == "failed":
        click.echo(f"edgepipe: job {name} failed (attempt {out.attempt}): {out.error}", err=True)
        sys.exit(1)
    result = out.result or {}
    if as_json:
        emit_json(result)
    else:
        for key, value in result.items():
            click.echo(f"{key:>24} {value}")


def _job_rows(env: Any) -> list[dict[str, Any]]:
    from pipeline.cli.compose import register_jobs
    from pipeline.jobruns import JobStore
    from scheduler.service import load_specs

    register_jobs()  # the cron table is checked against the registered jobs
    now = clock.now()
    last = JobStore(env.DB).last_runs()
    rows = []
    for spec in load_specs(env.config):
        run = last.get(spec.name) or {}
        nxt = spec.next_fire(now)
        rows.append(
            {
                "job": spec.name,
                "cron": spec.expr,
                "timezone": spec.timezone,
                "next_run": None if nxt is None else clock.iso(nxt.timestamp()),
                "next_run_local": None if nxt is None else nxt.isoformat(),
                "last_scheduled_for": run.get("scheduled_for"),
                "last_status": run.get("status"),
                "last_attempt": run.get("attempt"),
                "last_finished_at": run.get("finished_at"),
                "last_error": run.get("error"),
            }
        )
    return rows


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def jobs_list(state: State, as_json: bool) -> None:
    """The cron table: expression, time zone, next fire time, last run and its status."""
    rows = _job_rows(state.env())
    if as_json:
        emit_json(rows)
    else:
        cols = ("job", "cron", "timezone", "next_run_local", "last_scheduled_for", "last_status", "last_attempt")
        print_table(rows, cols, "scheduled jobs")


@jobs.command("history")
@click.option("--job", "job_name", help="Only this job.")
@click.option("--status", type=click.Choice(["running", "succeeded", "failed", "abandoned", "dry_run"]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@pass_state
def jobs_history(state: State, job_name: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """Recorded runs, newest first (scheduled and by hand, every attempt)."""
    from pipeline.jobruns import JobStore

    rows = JobStore(state.env().DB).history(job_name, limit, status)
    if as_json:
        emit_json(rows)
    else:
        cols = ("id", "job", "scheduled_for", "attempt", "status", "started_at", "finished_at", "error")
        print_table(rows, cols, "job runs")


def _print_fields(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(doc)
    else:
        for key, value in doc.items():
            click.echo(f"{key:>14} {value}")


@main.group()
def watermark() -> None:
    """The archive watermark: events older than it are refused as too_late."""


@watermark.command("show")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def watermark_show(state: State, as_json: bool) -> None:
    """The watermark, the retention policy's cutoff (now - [retention] detail_days),
    whether the watermark is ahead of it (by more than 60 s) and the safe floor."""
    from archiver.job import watermark_status

    _print_fields(watermark_status(state.env()), as_json)


@watermark.command("repair")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def watermark_repair(state: State, as_json: bool) -> None:
    """Lower a watermark that is ahead of the policy cutoff to the safe floor.

    Safe floor = max(policy cutoff, 1 ms + the newest event ts of any recorded archive
    object that is neither pending nor replaced): the rows of those objects have left or
    will leave the database, so the watermark stays above them, or a duplicate of one
    would be accepted and counted twice. A watermark not ahead (at most 60 s past the
    policy cutoff) is left as it is; the watermark is never raised. Runs under the archive
    job's lease: exits 4 while the archive job runs."""
    from archiver.job import repair_watermark

    _print_fields(repair_watermark(state.env()), as_json)
