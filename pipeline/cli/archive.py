"""`edgepipe stats`, `edgepipe verify` and `edgepipe replay …` (the archive side).

Replay commands work from the bucket alone; a truncated or corrupt object is named on
stderr and skipped, the others are processed, and the command exits 6 (integrity). On a
terminal, a progress bar over the range's objects is drawn on stderr.

`restore`, `drop-restored` and `rebuild` leave one audit row each: `replay.drop_restored`
in the transaction of its delete; `replay.restore` (a transaction per batch of rows, so
that a long restore never holds SQLite's write lock for long) and `replay.rebuild` (whose
writes go to another database) right after their work.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from pipeline import clock
from pipeline.cli import State, emit_json, main, pass_state, time_option
from pipeline.errors import IntegrityError, ValidationError

if TYPE_CHECKING:
    from pipeline.audit import Result

INTEGRITY_EXIT = IntegrityError.exit_code


def _range(start: str | None, end: str | None) -> tuple[float, float]:
    lo, hi = time_option(start, "--from"), time_option(end, "--to")
    return 946_684_800.0 if lo is None else lo, clock.now_s() + 3600 if hi is None else hi


def _checked_range(start: str | None, end: str | None) -> tuple[float, float]:
    """`_range`, refused (exit 3) before anything is done when it is empty."""
    from archiver.replay import hour_range

    lo, hi = _range(start, end)
    hour_range(lo, hi)
    return lo, hi


@contextmanager
def _audited(env: Any, name: str, lo: float, hi: float, *, same_transaction: bool = True,
             **params: Any) -> Iterator[Result]:  # fmt: skip
    """`audit.action` for a replay command: params `from`, `to` and the `params` given."""
    from pipeline import audit

    params = {"from": clock.iso(lo), "to": clock.iso(hi)} | params
    with audit.action(env.DB, audit.cli_actor(), name, params, same_transaction=same_transaction) as result:
        yield result


def _outcome(done: Result, result: dict[str, Any], *counts: str) -> None:
    """Copy `counts` of a replay result into the audit result; skipped corrupt objects make
    the outcome `partial`, naming them."""
    from pipeline.audit import Outcome

    done.update({k: result[k] for k in counts} | {"bad": len(result.get("bad", []))})
    if result.get("bad"):
        done.outcome = Outcome.PARTIAL
        done.detail = "skipped corrupt objects: " + ", ".join(b["key"] for b in result["bad"])


def _archive(state: State) -> tuple[Any, Any, str]:
    env = state.env()
    if env.ARCHIVE is None:
        raise ValidationError("bindings.archive", "no archive binding configured")
    return env, env.ARCHIVE, env.config.archive.prefix


def _hour_spans(hours: list[int]) -> str:
    """Hours (epoch s, ascending) as runs of consecutive hours: `A`, `A to B`."""
    spans: list[list[int]] = []
    for h in hours:
        if spans and h == spans[-1][1] + 3600:
            spans[-1][1] = h
        else:
            spans.append([h, h])
    return ", ".join(clock.iso(a) if a == b else f"{clock.iso(a)} to {clock.iso(b)}" for a, b in spans)


def _retention_notes(result: dict[str, Any]) -> None:
    """Name on stderr what retention took out of the range (see `archiver.replay`)."""
    if expired := result.get("expired_hours"):
        click.echo(f"edgepipe: {len(expired)} expired hours, their objects deleted by [retention] archive_days: "
                   f"{_hour_spans(expired)}", err=True)  # fmt: skip
    if pruned := result.get("pruned_hours"):
        click.echo(f"edgepipe: {len(pruned)} hours of pruned days not verified (the range cuts their day, or the "
                   f"day has an expired or bad hour): {_hour_spans(pruned)}", err=True)  # fmt: skip
    if note := result.get("note"):
        click.echo(f"edgepipe: {note}", err=True)


def _finish(result: dict[str, Any], as_json: bool, summary: str) -> None:
    if as_json:
        emit_json(result)
    else:
        click.echo(summary)
    _retention_notes(result)
    for bad in result.get("bad", []):
        click.echo(f"edgepipe: skipped {bad['key']}: {bad['error']}", err=True)
    if not result.get("ok", True):
        sys.exit(INTEGRITY_EXIT)


@contextmanager
def _object_progress(quiet: bool) -> Iterator[Any]:
    """A progress bar over the range's archive objects on a terminal's stderr (stdout may
    carry the output); None when `quiet` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("objects"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("objects", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


range_options = [
    click.option("--from", "start", metavar="T", help="Start (RFC 3339 or date); default: the beginning."),
    click.option("--to", "end", metavar="T", help="End, exclusive; default: now."),
]


def with_range(fn: Any) -> Any:
    for option in reversed(range_options):
        fn = option(fn)
    return fn


@main.command("stats")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def stats_cmd(state: State, as_json: bool) -> None:
    """Events hot (in the DB), cold (cleaned into lifetime totals) and total (aggregates),
    and `rejected`: per reason, the events dead-lettered for good since deployment, whether
    still in the DLQ or purged (a redriven letter is no longer counted)."""
    from pipeline import totals

    env = state.env()
    s = totals.stats(env.DB) | {"rejected": env.QUEUE.rejected_totals()}
    if as_json:
        emit_json(s)
        return
    click.echo(f"deployment started {s['deployment_started_at']}")
    click.echo(f"{'':>12} {'hot':>14} {'cold':>14} {'total':>14}")
    for field in totals.FIELDS:
        click.echo(
            f"{field:>12} "
            + " ".join(
                f"{s[part][field]:>14,.{2 if field == 'rt_sum_ms' else 0}f}" for part in ("hot", "cold", "total")
            )
        )
    click.echo(f"{'rejected':>12} " + ", ".join(f"{reason} {n:,}" for reason, n in s["rejected"].items()))


@main.command("verify")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def verify_cmd(state: State, as_json: bool) -> None:
    """Check hot + cold == total == sum of hourly requests, and every archived range."""
    from pipeline import totals

    result = totals.verify(state.env().DB)
    if as_json:
        emit_json(result)
    else:
        for problem in result["problems"]:
            click.echo(f"FAIL {problem}")
        click.echo("ok" if result["ok"] else f"{len(result['problems'])} problem(s)")
    if not result["ok"]:
        sys.exit(INTEGRITY_EXIT)


@main.group()
def replay() -> None:
    """Work from the archive bucket alone: list, verify, export, restore, rebuild."""


@replay.command("list")
@with_range
@click.option("--json", "as_json", is_flag=True)
@pass_state
def replay_list(state: State, start: str | None, end: str | None, as_json: bool) -> None:
    """Archive objects of the range, with rows and bytes."""
    from archiver import replay as r

    env, store, prefix = _archive(state)
    objects = r.list_objects(store, prefix, *_range(start, end))
    _retention_notes({"expired_hours": r.expired_hours(env.DB, *_range(start, end))})
    if as_json:
        emit_json(objects)
        return
    for o in objects:
        click.echo(f"{o['key']}  rows={o['rows']}  bytes={o['bytes']}")
    click.echo(f"{len(objects)} objects, {sum(o['rows'] or 0 for o in objects):,} rows, "
               f"{sum(o['bytes'] for o in objects):,} bytes")  # fmt: skip


@replay.command("verify")
@with_range
@click.option("--json", "as_json", is_flag=True)
@pass_state
def replay_verify(state: State, start: str | None, end: str | None, as_json: bool) -> None:
    """Check objects (sha256, rows) and recompute the hourly aggregates against the DB."""
    from archiver.verify import verify

    env, store, prefix = _archive(state)
    with _object_progress(as_json) as progress:
        result = verify(env.DB, store, prefix, *_range(start, end), progress, config=env.config)
    if not as_json:
        for m in result["mismatches"][:50]:
            click.echo(f"MISMATCH {clock.iso(m['hour'])} {m['host']} {m['method']} {m['path']} {m['column']}: "
                       f"archive {m['archive']} database {m['database']}")  # fmt: skip
    summary = (
        f"{result['objects']} objects, {result['archived_rows']:,} archived + {result['hot_rows']:,} hot rows, "
        f"{len(result['mismatches'])} mismatches, {len(result['bad'])} bad objects"
    )
    _finish(result, as_json, summary)


@replay.command("export")
@with_range
@click.option("--path", "path", metavar="P", help="Only rows of this (normalised) path.")
@click.option("--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True)
@click.option("--output", "output", type=click.File("w"), default="-", show_default=True)
@pass_state
def replay_export(state: State, start: str | None, end: str | None, path: str | None, fmt: str, output: Any) -> None:
    """Stream archived rows as NDJSON or CSV."""
    from archiver import replay as r

    env, store, prefix = _archive(state)
    with _object_progress(False) as progress:
        result = r.export(store, prefix, *_range(start, end), output, fmt, path, progress)
    output.flush()
    _retention_notes({"expired_hours": r.expired_hours(env.DB, *_range(start, end))})
    click.echo(f"exported {result['rows']:,} rows from {result['objects']} objects", err=True)
    _finish_quiet(result)


def _finish_quiet(result: dict[str, Any]) -> None:
    for bad in result["bad"]:
        click.echo(f"edgepipe: skipped {bad['key']}: {bad['error']}", err=True)
    if not result["ok"]:
        sys.exit(INTEGRITY_EXIT)


@replay.command("restore")
@with_range
@click.option("--json", "as_json", is_flag=True)
@pass_state
def replay_restore(state: State, start: str | None, end: str | None, as_json: bool) -> None:
    """Put archived rows back into traffic_events (idempotent; aggregates untouched)."""
    from archiver import replay as r

    env, store, prefix = _archive(state)
    lo, hi = _checked_range(start, end)
    with _object_progress(as_json) as progress, _audited(env, "replay.restore", lo, hi, same_transaction=False) as done:
        result = r.restore(env.DB, store, prefix, lo, hi, progress)
        _outcome(done, result, "objects", "rows", "inserted")
    _finish(
        result, as_json, f"restored {result['inserted']:,} of {result['rows']:,} rows from {result['objects']} objects"
    )


@replay.command("drop-restored")
@with_range
@click.option("--json", "as_json", is_flag=True)
@pass_state
def replay_drop_restored(state: State, start: str | None, end: str | None, as_json: bool) -> None:
    """Delete rows that `restore` put back (they stay in the bucket; totals unchanged)."""
    from archiver import replay as r

    env = state.env()
    lo, hi = _checked_range(start, end)
    with _audited(env, "replay.drop_restored", lo, hi) as done:
        result = r.drop_restored(env.DB, lo, hi)
        _outcome(done, result, "deleted")
    _finish(result, as_json, f"dropped {result['deleted']:,} restored rows")


@replay.command("rebuild")
@with_range
@click.option("--into", "into", required=True, metavar="DB_URL", help="A fresh database to rebuild into.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def replay_rebuild(state: State, start: str | None, end: str | None, into: str, as_json: bool) -> None:
    """Rebuild the hourly aggregates into DB_URL from the archive alone."""
    from archiver import replay as r
    from pipeline import migrate
    from pipeline.audit import public_url
    from pipeline.bindings.db import Database

    env, store, prefix = _archive(state)
    lo, hi = _checked_range(start, end)
    expired = r.expired_hours(env.DB, lo, hi)
    with _audited(env, "replay.rebuild", lo, hi, same_transaction=False, into=public_url(into)) as done:
        target = Database(into)
        try:
            migrate.upgrade(target)
            with _object_progress(as_json) as progress:
                result = r.rebuild(store, prefix, lo, hi, target, progress) | {"expired_hours": expired}
        finally:
            target.dispose()
        _outcome(done, result, "objects", "rows", "hourly_rows")
    _finish(result, as_json, f"rebuilt {result['hourly_rows']:,} hourly rows from {result['rows']:,} archived rows")
