"""Operations: `edgepipe snapshot …`, `edgepipe monitor`, `edgepipe status`."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.cli import State, emit_json, main, pass_state, print_table
from pipeline.errors import NotFound


@main.group()
def snapshot() -> None:
    """Hot-path snapshots in the KV binding."""


@snapshot.command("show")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def snapshot_show(state: State, as_json: bool) -> None:
    """The latest published snapshot."""
    import snapshots

    snap = snapshots.read_latest(state.env().KV)
    if snap is None:
        raise NotFound("no snapshot published yet (run `edgepipe snapshot refresh`)")
    if as_json:
        emit_json(snap)
        return
    cols = ("path", "method", "requests", "errors", "error_rate", "rt_avg_ms", "p50_ms", "p95_ms", "p99_ms")
    title = f"snapshot v{snap['version']} at {snap['generated_at']}, last {snap['window_hours']} h"
    print_table(snap["paths"], cols, title)


@snapshot.command("refresh")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def snapshot_refresh(state: State, as_json: bool) -> None:
    """Build and publish a new snapshot version now."""
    import snapshots

    result = snapshots.refresh(state.env())
    if as_json:
        emit_json(result)
    else:
        click.echo(f"published {result['key']} ({result['paths']} paths, {result['ms']} ms)", err=True)


@snapshot.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def snapshot_list(state: State, as_json: bool) -> None:
    """Stored snapshot versions, oldest first."""
    import snapshots

    rows = snapshots.list_versions(state.env().KV)
    if as_json:
        emit_json(rows)
    else:
        print_table(rows, ("key", "version", "generated_at", "paths"), "snapshot versions")


@snapshot.command("prune")
@click.option("--keep", default=None, type=click.IntRange(min=1), help="Versions to keep [default: [snapshots] keep].")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def snapshot_prune(state: State, keep: int | None, dry_run: bool, as_json: bool) -> None:
    """Delete all but the newest KEEP versions (`snapshot:latest` is kept)."""
    import snapshots

    env = state.env()
    result = snapshots.prune(env.KV, keep or env.config.snapshots.keep, dry_run=dry_run)
    if as_json:
        emit_json(result)
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{verb} {result['deleted']} versions, kept {result['kept_versions']}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--check", is_flag=True, help="Exit 1 when any threshold is crossed (for cron and alerting).")
@pass_state
def monitor(state: State, as_json: bool, check: bool) -> None:
    """Capacity and health report: sizes, growth, days until full, archive and clean lag,
    queue depth and age, DLQ, workers, jobs' last slots, and the alerts raised."""
    from scheduler.monitor import report

    r = report(state.env())
    if as_json:
        emit_json(r)
    else:
        _print_report(r)
    if check and r["alerts"]:
        sys.exit(1)


def _print_report(r: dict[str, Any]) -> None:
    sizes = r["table_bytes"] or {}
    rows = [{"table": t, "rows": n, "bytes": sizes.get(t)} for t, n in sorted(r["rows"].items())]
    print_table(
        rows, ("table", "rows", "bytes"), f"database {r['db_bytes']:,} bytes ({r['used_ratio']:.2%} of capacity)"
    )
    keys = ["growth_7d_bytes", "days_until_full", "oldest_unarchived_at", "archive_lag_rows", "clean_lag_rows"]
    keys += ["queue_depth", "queue_oldest_age_s", "dlq_depth", "dlq_growth_per_day", "workers_alive", "archive"]
    for key in keys:
        click.echo(f"{key:>24} {r[key]}")
    for name, j in r["jobs"].items():
        click.echo(f"{'job ' + name:>24} {j['status']} ({j['slot']})")
    for alert in r["alerts"]:
        click.echo(f"ALERT {alert}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--forget-dead", is_flag=True, help="First delete the rows of dead workers.")
@pass_state
def status(state: State, as_json: bool, forget_dead: bool) -> None:
    """Workers from their heartbeats; exits 1 unless at least one worker is alive and working.
    A worker silent for `[worker] dead_after` is dead; dead and stopped workers are listed
    until `[worker] forget_after`."""
    from pipeline import heartbeat

    env = state.env()
    cfg = env.config.worker
    if forget_dead:
        click.echo(f"forgot {heartbeat.forget(env.DB, cfg.dead_after)} dead workers", err=True)
    s = heartbeat.status(env.DB, env.QUEUE.depth(), dead_after=cfg.dead_after, forget_after=cfg.forget_after)
    if as_json:
        emit_json(s)
    else:
        cols = ("holder", "state", "verdict", "reason", "last_seen_at", "last_batch_at", "last_job_at", "batches")
        print_table(
            s["workers"], cols, f"workers ({'healthy' if s['healthy'] else 'UNHEALTHY'}), queue {s['queue_depth']}"
        )
    if not s["healthy"]:
        sys.exit(1)
