"""Core commands: init, db, ingest, consume, worker, queue, paths, sample."""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson

from pipeline import clock, log
from pipeline.cli import State, emit_json, main, pass_state, print_table, time_option


def _data_dirs(cfg: Any) -> list[Path]:
    dirs = [Path(cfg.cleaner.stats_file).parent]
    if cfg.bindings.archive.startswith("file://"):
        dirs.append(Path(cfg.bindings.archive.removeprefix("file://")))
    return dirs


@main.command()
@pass_state
def init(state: State) -> None:
    """Create the data directories and upgrade the database schema (idempotent)."""
    from pipeline import migrate
    from pipeline.bindings.db import Database

    cfg = state.config
    for d in _data_dirs(cfg):
        d.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.bindings.db)
    try:
        rev = migrate.upgrade(db)
        from pipeline.meta import ensure_deployment_start

        ensure_deployment_start(db)
    finally:
        db.dispose()
    from pipeline.env import open_env

    env = open_env(cfg)
    try:
        env.QUEUE.ensure()  # an SQS queue and its -dlq, a Redis consumer group: created when missing
    finally:
        env.close()
    click.echo(f"initialised {cfg.bindings.db} (schema {rev}, queue {cfg.bindings.queue})", err=True)


@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_state
def db_upgrade(state: State, revision: str) -> None:
    """Apply Alembic migrations up to REVISION (idempotent)."""
    from pipeline import migrate
    from pipeline.bindings.db import Database

    database = Database(state.config.bindings.db)
    try:
        click.echo(f"schema at {migrate.upgrade(database, revision)}", err=True)
    finally:
        database.dispose()


@db.command("current")
@pass_state
def db_current(state: State) -> None:
    """Print the schema revision of the database (empty when uninitialised)."""
    from pipeline import migrate
    from pipeline.bindings.db import Database

    database = Database(state.config.bindings.db)
    try:
        click.echo(migrate.current_revision(database) or "")
    finally:
        database.dispose()


@main.command()
@click.argument("source", type=click.File("rb"))
@click.option("--json", "as_json", is_flag=True, help='Print {"enqueued": n, "rejected": n}.')
@click.option("--resume", is_flag=True, help="Continue an ingest of this FILE after its last committed send.")
@pass_state
def ingest(state: State, source: Any, as_json: bool, resume: bool) -> None:
    """Validate events from SOURCE (NDJSON or a JSON array, `-` for stdin) and enqueue them.

    Rejected lines (array elements are numbered as lines) are reported on stderr with their
    line numbers; the valid ones are enqueued. Exits 3 when any line was rejected. When the
    queue fails part-way, says how many events were enqueued, through which line, and exits
    with the error's code (`--json` adds "last_line" and "error").

    From a FILE, an event without an `id` gets `<file hash>:<line>`, and the progress is
    recorded after every send: `--resume` skips the lines a killed or failed ingest of the
    same file already handled, so nothing is enqueued twice (a changed file starts from its
    first line; `--json` adds "resumed_after"). stdin cannot be resumed (exit 3)."""
    from pipeline.errors import EdgepipeError
    from pipeline.paths import PathNormalizer
    from pipeline.producer import IngestResult, open_source, read_lines
    from pipeline.producer import ingest as run_ingest

    stream = source
    if not hasattr(stream, "peek"):  # a JSON array is recognised by peeking at its first bytes
        stream = getattr(stream, "buffer", None) or io.BufferedReader(stream)
    env = state.env()
    normalizer = PathNormalizer(env.config.paths)
    stdin = source is getattr(sys.stdin, "buffer", None)  # what click opens for `-`
    origin = open_source(stream, env.QUEUE, env.DB, resume, stdin)  # --resume on stdin: ValidationError, exit 3
    result = IngestResult()  # filled as it goes: still there when the queue fails
    failure: EdgepipeError | None = None

    def run(progress: Any = None) -> None:
        run_ingest(read_lines(stream), env.QUEUE, normalizer, progress, result, origin)

    try:
        if sys.stderr.isatty() and not as_json:
            _ingest_with_progress(stream, run)
        else:
            run()
    except EdgepipeError as exc:
        failure = exc
    for number, reason in result.rejected[:50]:
        click.echo(f"line {number}: {reason}", err=True)
    if len(result.rejected) > 50:
        click.echo(f"… and {len(result.rejected) - 50} more rejected lines", err=True)
    resumed = {"resumed_after": result.resumed_after} if resume else {}
    if failure is not None:
        if as_json:
            emit_json({"enqueued": result.enqueued, "rejected": len(result.rejected), **resumed,
                       "last_line": result.last_line, "error": str(failure)})  # fmt: skip
        lines = f" (lines {result.resumed_after + 1}-{result.last_line})" if result.enqueued else ""
        click.echo(f"edgepipe: enqueued {result.enqueued} events{lines} before the failure: {failure}", err=True)
        sys.exit(failure.exit_code)
    if as_json:
        emit_json({"enqueued": result.enqueued, "rejected": len(result.rejected), **resumed})
    else:
        after = f" (resumed after line {result.resumed_after})" if resume else ""
        click.echo(f"enqueued {result.enqueued} events, rejected {len(result.rejected)}{after}", err=True)
    if result.rejected:
        sys.exit(3)


def _ingest_with_progress(stream: Any, run: Any) -> None:
    """`run(advance)` under a progress line on the terminal: a bar by bytes read for a
    regular file, a spinner for a stream; updated once per send."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

    try:
        size: int | None = os.fstat(stream.fileno()).st_size if stream.seekable() else None
    except (OSError, ValueError, io.UnsupportedOperation):
        size = None
    columns = (BarColumn(), TaskProgressColumn()) if size else (SpinnerColumn(),)
    with Progress(*columns, TextColumn("{task.description}"), transient=True) as bar:
        task = bar.add_task("enqueued 0 events", total=size or None)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            bar.update(task, description=f"enqueued {done[0]:,} events", completed=stream.tell() if size else None)

        run(advance)


@main.command()
@click.option("--until-empty", is_flag=True, help="Exit when no message is visible.")
@click.option("--max-batches", type=click.IntRange(min=1), help="Exit after N batches.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def consume(state: State, until_empty: bool, max_batches: int | None, as_json: bool) -> None:
    """Run the queue consumer in the foreground, then exit (for cron and tests)."""
    from pipeline.cli.compose import consumer_worker

    env = state.env()
    worker = consumer_worker(env)
    _install_signals(worker)
    try:
        batches = worker.run(until_empty=until_empty, max_batches=max_batches)
    finally:
        worker.close()
    stats = env.QUEUE.stats()
    if as_json:
        emit_json({"batches": batches, **stats})
    else:
        click.echo(f"processed {batches} batches; queue {stats}", err=True)


def _install_signals(target: Any) -> None:
    """First SIGTERM/SIGINT: `target.request_stop()` (finish what is in hand, then exit 0).
    A second one exits at once; leases held in the database simply expire."""

    def handle(signum: int, _frame: Any) -> None:
        if target.stop_requested:
            os._exit(128 + signum)
        target.request_stop()
        log.event("stopping", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


@main.command()
@click.option("--no-scheduler", is_flag=True, help="Only consume; run no scheduled jobs in this process.")
@pass_state
def worker(state: State, no_scheduler: bool) -> None:
    """The long-running process: consume the queue, refresh the KV snapshot every
    `[consumer] snapshot_every_batches` batches and run the scheduled jobs; with `[worker]
    metrics_port`, serve Prometheus metrics there (a port in use: exit 2). SIGTERM/SIGINT:
    finish the batch and job in hand, release leases, exit 0; a second signal exits at once."""
    from pipeline.cli.compose import worker_process

    process = worker_process(state.env(), with_scheduler=not no_scheduler)
    _install_signals(process)
    process.run()


@main.group()
def queue() -> None:
    """Queue inspection and dead letters."""


@queue.command("stats")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def queue_stats(state: State, as_json: bool) -> None:
    """Pending, in-flight and dead-lettered message counts."""
    stats = state.env().QUEUE.stats()
    if as_json:
        emit_json(stats)
    else:
        for k, v in stats.items():
            click.echo(f"{k:>24} {v}")


@queue.group("dlq")
def dlq() -> None:
    """The dead-letter queue: list, redrive or purge letters, by reason and age.

    Every letter is counted for good per reason (`edgepipe stats`, `rejected`): a purge
    keeps the count, a redrive takes the letter out of it (it is processed again)."""


REASONS = "invalid, too_late, poison, retries_exhausted"


def dlq_filters(fn: Any) -> Any:
    """`--reason R` and `--before T`, shared by the `queue dlq` commands."""
    fn = click.option("--before", metavar="T", help="Only letters that failed before T (RFC 3339, date, epoch s).")(fn)
    return click.option("--reason", metavar="R", help=f"Only letters of this reason ({REASONS}).")(fn)


def _filters(reason: str | None, before: str | None) -> tuple[str | None, float | None]:
    """The filters, checked before the database is opened (a bad one exits 3)."""
    from pipeline.bindings.queue import parse_reason

    code = parse_reason(reason, "--reason")
    return None if code is None else code.value, time_option(before, "--before")


def _iso(t: float | None) -> str | None:
    return None if t is None else clock.iso(t)


@contextmanager
def _dlq_action(state: State, name: str, params: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """(the queue, the audit result) of a DLQ change, audited as `name` with `params` (its
    filters): in the transaction of the change when the queue lives in the DB binding's
    database, else right after the change."""
    from pipeline import audit

    env = state.env()
    shared = env.QUEUE.shares_transaction
    with audit.action(env.DB, audit.cli_actor(), name, params, same_transaction=shared) as result:
        yield env.QUEUE, result


@dlq.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@dlq_filters
@click.option("--json", "as_json", is_flag=True)
@pass_state
def dlq_list(state: State, limit: int, reason: str | None, before: str | None, as_json: bool) -> None:
    """Dead letters, oldest first, with their reasons."""
    code, cutoff = _filters(reason, before)
    rows = state.env().QUEUE.dlq_list(limit, reason=code, before=cutoff)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        click.echo(f"{r['failed_at']} {r['message_id']} attempts={r['attempts']} {r['reason']}: {r['error']}")


@dlq.command("redrive")
@click.option("--limit", type=click.IntRange(min=1), help="At most N letters, oldest first.")
@dlq_filters
@click.option("--json", "as_json", is_flag=True, help='Print {"redriven": n}.')
@pass_state
def dlq_redrive(state: State, limit: int | None, reason: str | None, before: str | None, as_json: bool) -> None:
    """Move dead letters back to the queue with a fresh attempt count. They leave the
    `rejected` count: a redriven letter is processed again (and counted again if it fails)."""
    code, cutoff = _filters(reason, before)
    with _dlq_action(state, "dlq.redrive", {"limit": limit, "reason": code, "before": _iso(cutoff)}) as (queue, result):
        n = result["redriven"] = queue.dlq_redrive(limit, reason=code, before=cutoff)
    if as_json:
        emit_json({"redriven": n})
    else:
        click.echo(f"redrove {n} messages", err=True)


@dlq.command("purge")
@dlq_filters
@click.option("--json", "as_json", is_flag=True, help='Print {"purged": n}.')
@pass_state
def dlq_purge(state: State, reason: str | None, before: str | None, as_json: bool) -> None:
    """Delete dead letters for good. With no filter, EVERY letter of the queue is purged
    (without asking). Purged letters stay counted in `rejected` (`edgepipe stats`)."""
    code, cutoff = _filters(reason, before)
    with _dlq_action(state, "dlq.purge", {"reason": code, "before": _iso(cutoff)}) as (queue, result):
        n = result["purged"] = queue.dlq_purge(reason=code, before=cutoff)
    if as_json:
        emit_json({"purged": n})
    else:
        click.echo(f"purged {n} dead letters", err=True)


@main.group()
def paths() -> None:
    """Per-path statistics from the hourly and daily aggregates."""


TABLE_COLUMNS = ("path", "method", "requests", "status_4xx", "status_5xx", "rt_avg_ms", "p50_ms", "p95_ms", "p99_ms")


@paths.command("top")
@click.option("--hours", default=24, show_default=True, type=click.IntRange(1, 24 * 366))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@pass_state
def paths_top(state: State, hours: int, limit: int, as_json: bool) -> None:
    """The busiest paths over the last HOURS hours."""
    from pipeline import queries

    rows = queries.top_paths(state.env().DB, hours, limit)
    if as_json:
        emit_json(rows)
    else:
        print_table(rows, TABLE_COLUMNS, f"top {limit} paths, last {hours} h")


@paths.command("hourly")
@click.option("--path")
@click.option("--method")
@click.option("--host")
@click.option("--from", "start", metavar="T", help="RFC 3339 or epoch seconds (inclusive).")
@click.option("--to", "end", metavar="T", help="RFC 3339 or epoch seconds (exclusive).")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def paths_hourly(state: State, path: str | None, method: str | None, host: str | None,
                 start: str | None, end: str | None, as_json: bool) -> None:  # fmt: skip
    """Hourly rows; with no filter, every path and every hour in the database."""
    from pipeline import queries

    rows = queries.hourly(state.env().DB, path, method, time_option(start, "--from"), time_option(end, "--to"), host)
    if not as_json:
        shown = [r | {"hour": r["hour"][5:13].replace("T", " ") + "h"} for r in rows]  # 11-22 04h (UTC)
        print_table(shown, ("hour", *TABLE_COLUMNS), "hourly (UTC)")
        return
    out = sys.stdout.buffer
    out.write(b"[")
    for i, row in enumerate(rows):
        out.write(b",\n" if i else b"\n")
        out.write(orjson.dumps(row))
    out.write(b"\n]\n")
    out.flush()


@paths.command("daily")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 36_600), help="The last N days.")
@click.option("--path")
@click.option("--method")
@click.option("--host")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def paths_daily(state: State, days: int, path: str | None, method: str | None, host: str | None,
                as_json: bool) -> None:  # fmt: skip
    """Daily rows of the last DAYS closed UTC days (rolled up by the `rollup` job, 00:15)."""
    from pipeline import queries

    start = (int(clock.now_s()) // 86_400 - days) * 86_400
    rows = list(queries.daily(state.env().DB, path, method, start, None, host))
    if as_json:
        emit_json(rows)
    else:
        print_table([r | {"day": r["day"][:10]} for r in rows], ("day", *TABLE_COLUMNS), "daily (UTC)")


@main.command("sample")
@click.option("--events", "n", default=20_000, show_default=True, type=click.IntRange(min=0))
@click.option("--days", default=5.0, show_default=True, type=click.FloatRange(0.01, 365))
@click.option("--paths", "n_paths", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=42, show_default=True)
@click.option("--output", "-o", type=click.File("wb"), default="-", show_default=True)
def sample_cmd(n: int, days: float, n_paths: int, seed: int, output: Any) -> None:
    """Write synthetic NDJSON traffic ending now (skewed paths, random ids)."""
    from pipeline import sample

    for ev in sample.events(n, days=days, n_paths=n_paths, seed=seed):
        output.write(orjson.dumps(ev) + b"\n")
