"""`edgepipe jobs …`: run the scheduled jobs by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from pipeline import clock
from pipeline.cli import emit_json, main, pass_state
from pipeline.errors import NotFound, ValidationError
from pipeline.jobs import load_jobs


@main.group()
def jobs() -> None:
    """Scheduled jobs: archive, clean, monitor, snapshot_prune."""


@jobs.command("run")
@click.argument("name")
@click.option("--at", "at", metavar="T", help="Scheduled time of the run (RFC 3339); default now.")
@click.option("--dry-run", is_flag=True, help="Report what would be done, change nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def jobs_run(state: Any, name: str, at: str | None, dry_run: bool, as_json: bool) -> None:
    """Run job NAME once, now, as if scheduled at T."""
    registry = load_jobs()
    if name not in registry:
        raise NotFound(f"unknown job {name!r} (known: {', '.join(sorted(registry)) or 'none'})")
    try:
        when = clock.now() if at is None else datetime.fromtimestamp(clock.parse_time(at), UTC)
    except ValueError as exc:
        raise ValidationError("--at", str(exc)) from None
    result = registry[name](state.env(), when, dry_run)
    if as_json:
        emit_json(result)
    else:
        for key, value in result.items():
            click.echo(f"{key:>24} {value}")
