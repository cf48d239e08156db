"""`edgepipe backup …`: backups of the database through the ARCHIVE binding.

`create` backs the configured database up now; `list`, `verify` and `restore` work from
the bucket alone (the configured database is not opened, so they work when it is gone);
`prune` applies `[backup] keep_daily` / `keep_weekly`. A corrupt, truncated or incomplete
backup is named on stderr and the command exits 6; on a terminal, a progress bar over the
bytes streamed is drawn on stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from pipeline import clock
from pipeline.cli import State, emit_json, main, pass_state, print_table
from pipeline.errors import IntegrityError


@main.group()
def backup() -> None:
    """Backups of the database to the ARCHIVE binding (backups/<id>/): create, list,
    verify, restore, prune."""


@contextmanager
def _progress(quiet: bool, what: str) -> Iterator[Any]:
    """A progress bar by bytes on a terminal's stderr (stdout may carry the output); None
    when `quiet` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

    columns = (SpinnerColumn(), TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _store(state: State, check_schema: bool = False) -> Any:
    return state.env(check_schema=check_schema).require_archive()


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f} MB"


@backup.command("create")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest.")
@pass_state
def backup_create(state: State, as_json: bool) -> None:
    """Back up the database now (retention is the `backup` job's, or `backup prune`)."""
    from archiver.backup import create

    env = state.env()
    with _progress(as_json, "backup") as progress:
        manifest = create(env, progress=progress)
    if as_json:
        emit_json(manifest)
        return
    click.echo(f"backup {manifest['id']}: {manifest['rows']:,} rows in {len(manifest['tables'])} tables, "
               f"{_mb(manifest['size'])} ({manifest['payload']}, {_mb(manifest['raw_bytes'])} before gzip), "
               f"{manifest['seconds']} s")  # fmt: skip


@backup.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def backup_list(state: State, as_json: bool) -> None:
    """Backups in the bucket, oldest first: complete, incomplete (no manifest: a run that
    failed or is in progress) or unreadable (a manifest that does not parse)."""
    from archiver.backup import entries

    rows = [e.describe() for e in entries(_store(state))]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["size_mb"] = _mb(r["size"])
    print_table(rows, ("id", "status", "payload", "schema", "rows", "size_mb", "finished_at"), "backups")


@backup.command("verify")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "every", is_flag=True, help="Verify every backup in the bucket.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def backup_verify(state: State, ids: tuple[str, ...], every: bool, as_json: bool) -> None:
    """Re-read backups (size and sha256 against the manifest) and restore each into a
    scratch SQLite database (rows per table against the manifest; `totals_ok`: edgepipe
    verify's checks there). Default: the newest complete backup. Exits 6 naming each
    backup that is incomplete, truncated, corrupt or does not restore."""
    from archiver.backup import entries, verify

    store = _store(state)
    chosen: list[str | None] = [e.id for e in entries(store)] if every else list(ids) or [None]
    results = []
    for backup_id in chosen:
        with _progress(as_json, f"verify {backup_id or 'newest'}") as progress:
            results.append(verify(store, backup_id, progress))
    ok = all(r["ok"] for r in results)
    if as_json:
        emit_json({"ok": ok, "backups": results})
    else:
        for r in results:
            status = "ok" if r["ok"] else "FAILED"
            click.echo(f"{r['id']}  {status}  rows={r['rows']}  totals_ok={r['totals_ok']}  {r['seconds']} s")
    for r in results:
        if not r["ok"]:
            click.echo(f"edgepipe: {r['error']}", err=True)
    if not ok:
        sys.exit(IntegrityError.exit_code)


@backup.command("restore")
@click.argument("backup_id", required=False, metavar="[ID]")
@click.option("--into", "into", required=True, metavar="DB_URL", help="An empty database to build.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def backup_restore(state: State, backup_id: str | None, into: str, as_json: bool) -> None:
    """Build the empty database DB_URL from backup ID (default: the newest complete one),
    SQLite or PostgreSQL whatever the backup's source. Refuses a target holding rows
    (exit 3); checks the backup's size and sha256 before writing anything (exit 6). The
    restore is audited in the new database (`backup.restore`)."""
    from archiver.backup import restore
    from pipeline import audit, log
    from pipeline.bindings.db import Database

    store = _store(state)
    target = Database(into)
    try:
        with _progress(as_json, "download") as progress:
            result = restore(store, backup_id, target, audit.cli_actor(), progress)
    except Exception as exc:
        shown = {"id": backup_id or "newest", "into": audit.public_url(into)}
        log.event("backup_restore_failed", logging.WARNING, **shown, error=exc)
        raise
    finally:
        target.dispose()
    result["into"] = audit.public_url(into)
    if as_json:
        emit_json(result)
        return
    click.echo(f"restored backup {result['id']} into {result['into']}: {result['rows']:,} rows, "
               f"schema {result['restored_schema']}, {result['seconds']} s")  # fmt: skip


@backup.command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def backup_prune(state: State, dry_run: bool, as_json: bool) -> None:
    """Delete the backups retention does not keep: the newest of each of the last
    `[backup] keep_daily` days and of each of the last `keep_weekly` ISO weeks (UTC) are
    kept, and the newest backup always; incomplete ones older than a day go too."""
    from archiver.backup import prune

    cfg = state.config.backup
    result = prune(_store(state), clock.now_s(), cfg.keep_daily, cfg.keep_weekly, dry_run)
    if as_json:
        emit_json(result)
        return
    verb = "would delete" if dry_run else "deleted"
    for kept in result["kept"]:
        click.echo(f"keep    {kept['id']}  ({', '.join(kept['reasons'])})")
    for backup_id in result["deleted"] + result["incomplete_deleted"]:
        click.echo(f"{verb:<7} {backup_id}")
    for backup_id in result["unreadable"]:
        click.echo(f"edgepipe: backup {backup_id}: its manifest cannot be read; kept", err=True)
