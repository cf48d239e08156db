"""`edgepipe bench …`: the benchmark commands. Registered on `edgepipe` by importing this
module (from `pipeline.cli`); each command loads its benchmark only when it runs."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli import emit_json, main


@main.group()
def bench() -> None:
    """Benchmarks (ratios against a reference measured in the same run)."""


def _report(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        emit_json(result)
    else:
        for line in lines:
            click.echo(line.format(**result))


@bench.command("consume")
@click.option("--events", "n", default=1_000_000, show_default=True, type=click.IntRange(min=1000))
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--db", "db_url", metavar="URL", help="Run edgepipe's side on this database (default: a temp SQLite file)."
)
@click.option(
    "--snapshots", is_flag=True, help="Also consume with a snapshot refresh every 10 batches; report the overhead."
)
@click.option("--json", "as_json", is_flag=True)
def bench_consume(n: int, batch_size: int, db_url: str | None, snapshots: bool, as_json: bool) -> None:
    """Consumer throughput vs the raw SQLite insert limit, then a pass of all duplicates."""
    from pipeline.bench.consume import run

    result = run(n, batch_size, db_url, progress=lambda m: click.echo(f"… {m}", err=True), snapshots=snapshots)
    _report(
        result,
        as_json,
        [
            "raw SQLite limit      {raw_events_per_s:>10,} events/s"
            "  (beside the duplicates pass {raw_duplicate_pass_events_per_s:,})",
            "enqueue               {enqueue_events_per_s:>10,} events/s",
            "consumer ({db})   {consumer_events_per_s:>10,} events/s  ratio {ratio}",
            "batch latency         p50 {batch_p50_ms} ms  p99 {batch_p99_ms} ms",
            "duplicates            {duplicate_events_per_s:>10,} events/s  ratio {duplicate_ratio}",
            "CPU-time ratios       consumer {cpu_ratio}  duplicates {cpu_duplicate_ratio}",
            *(
                [
                    "with snapshots        {snapshot_events_per_s:>10,} events/s  overhead {snapshot_overhead}"
                    " (CPU {snapshot_cpu_overhead}; {snapshot_refreshes} refreshes)"
                ]
                if snapshots
                else []
            ),
        ],
    )


def _worker_counts(_ctx: Any, _param: Any, value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of worker counts") from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise click.BadParameter(f"{value!r}: each worker count must be in 1..64")
    return counts


@bench.command("scale")
@click.option("--workers", default="1,2,4", show_default=True, callback=_worker_counts, help="Worker counts to run.")
@click.option("--db", "db_url", metavar="URL", help="Database server (default: a temp SQLite file).")
@click.option(
    "--queue",
    "queue_url",
    metavar="URL",
    default="db",
    show_default=True,
    help="Queue: db (the database's table), sqs://NAME?… or redis://…?stream=NAME (must be empty).",
)
@click.option("--events", "n", default=200_000, show_default=True, type=click.IntRange(min=1000))
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def bench_scale(workers: list[int], db_url: str | None, queue_url: str, n: int, batch_size: int, as_json: bool) -> None:
    """Events/s with N `edgepipe worker` processes on one database and queue, per N."""
    from pipeline.bench.scale import run
    from pipeline.config import Bindings

    try:
        Bindings(queue=queue_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc).splitlines()[-1], param_hint="--queue") from None
    result = run(workers, db_url, queue_url, n, batch_size, progress=lambda m: click.echo(f"… {m}", err=True))
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['events']:,} events, batch {result['batch_size']}, db {result['db']}, queue {result['queue']}")
    for r in result["runs"]:
        click.echo(
            f"{r['workers']:>3} worker(s)  {r['events_per_s']:>9,} events/s  speed-up {r['speedup']:>6}"
            f"  CPU {r['cpu_s_per_1000_events']} s/1000 events  exact {r['exact']}"
        )


@bench.command("ingest")
@click.option("--events", "n", default=500_000, show_default=True, type=click.IntRange(min=1000))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 20), help="Alternations (median).")
@click.option("--json", "as_json", is_flag=True)
def bench_ingest(n: int, rounds: int, as_json: bool) -> None:
    """`edgepipe ingest FILE` (NDJSON) vs a raw SQLite executemany of the same queue rows."""
    from pipeline.bench.ingest import run

    result = run(n, rounds, progress=lambda m: click.echo(f"… {m}", err=True))
    _report(
        result,
        as_json,
        [
            "ingest      {events_per_s:>10,} events/s  ({events:,} events, {file_mb} MB of NDJSON)",
            "reference   {reference_rows_per_s:>10,} rows/s  ratio {ratio} (CPU {cpu_ratio})",
            "rounds      {round_ratios} (the median is reported)",
        ],
    )


@bench.command("snapshot")
@click.option("--paths", default=2000, show_default=True, type=click.IntRange(10, 100_000))
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1, 100), help="Refreshes timed (median).")
@click.option("--db", "db_url", metavar="URL", help="Database (default: a temp SQLite file).")
@click.option("--json", "as_json", is_flag=True)
def bench_snapshot(paths: int, repeat: int, db_url: str | None, as_json: bool) -> None:
    """Snapshot refresh over 7 days of hourly aggregates vs over 90 days (ratio ≤ 1.3:
    a refresh reads only its window)."""
    from pipeline.bench.snapshot import run

    result = run(paths, db_url, repeat, progress=lambda m: click.echo(f"… {m}", err=True))
    _report(
        result,
        as_json,
        [
            "refresh over 7 days   {refresh_7d_ms:>10} ms  ({rows_7d:,} hourly rows)",
            "refresh over 90 days  {refresh_90d_ms:>10} ms  ({rows_90d:,} hourly rows)",
            "ratio 90 d / 7 d      {ratio} (target ≤ 1.3)",
            "plan                  {plan}",
        ],
    )


def _archive_bench(kind: str, rows: int, as_json: bool) -> None:
    from pipeline.bench.archive import run

    result = run(kind, rows, progress=lambda m: click.echo(f"… {m}", err=True))
    _report(
        result,
        as_json,
        [
            f"{kind:<8} {{rows_per_s:>10,}} rows/s  {{mb_per_s}} MB/s (NDJSON)  compression {{compression_ratio}}x",
            "reference {reference_rows_per_s:>9,} rows/s  ratio {ratio}",
            "rounds    {round_ratios} (the median is reported)",
            "peak RSS  {peak_rss_mb} MB",
        ],
    )


for _kind, _doc in (
    ("archive", "Archive job vs serialising the same rows to NDJSON + gzip in memory."),
    ("clean", "Clean job vs a bare DELETE … WHERE seq BETWEEN in 1000-row batches."),
    ("replay", "Replay verify vs plain gunzip + JSON parse of the same objects."),
):

    def _make(kind: str) -> Any:
        def command(rows: int, as_json: bool) -> None:
            _archive_bench(kind, rows, as_json)

        return command

    bench.command(_kind, help=_doc)(
        click.option("--rows", default=1_000_000, show_default=True, type=click.IntRange(min=1000))(
            click.option("--json", "as_json", is_flag=True)(_make(_kind))
        )
    )


@bench.command("http")
@click.option("--seconds", default=3.0, show_default=True, type=click.FloatRange(0.5, 120), help="Load per target.")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 256), help="Connections.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 50), help="Alternations (median).")
@click.option("--json", "as_json", is_flag=True)
def bench_http(seconds: float, concurrency: int, rounds: int, as_json: bool) -> None:
    """POST /v1/events (100 events/request) vs a validate-and-discard endpoint; an app with
    the traffic collector vs without it. Servers run as subprocesses on loopback."""
    from pipeline.bench.http import run

    result = run(seconds, concurrency, rounds, progress=lambda m: click.echo(f"… {m}", err=True))
    _report(
        result,
        as_json,
        [
            "POST /v1/events      {edgepipe_requests_per_s:>10,} req/s  {edgepipe_events_per_s:>10,} events/s",
            "reference (discard)  {reference_requests_per_s:>10,} req/s  {reference_events_per_s:>10,} events/s",
            "ingest ratio         {ingest_ratio} (target ≥ 0.5)",
            "app with collector   {collector_requests_per_s:>10,} req/s",
            "app without          {plain_requests_per_s:>10,} req/s",
            "collector ratio      {collector_ratio} (target ≥ 0.9)",
        ],
    )


@bench.command("backup")
@click.option("--rows", default=1_000_000, show_default=True, type=click.IntRange(min=1000))
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def bench_backup(rows: int, batch_size: int, as_json: bool) -> None:
    """The backup job vs a stdlib SQLite backup + gzip of the same file; then the consumer's
    events/s while a backup runs vs without (same run)."""
    from pipeline.bench.backup import run

    result = run(rows, batch_size, progress=lambda m: click.echo(f"… {m}", err=True))
    _report(
        result,
        as_json,
        [
            "backup      {rows_per_s:>10,} rows/s  {mb_per_s} MB/s  ({backup_rows:,} rows, {db_mb} MB"
            " → {backup_mb} MB)",
            "reference   {reference_mb_per_s} MB/s  ratio {ratio} (CPU {cpu_ratio}; rounds {round_ratios})",
            "consumer    {consumer_events_per_s:>10,} events/s without a backup, batch p99 {batch_p99_ms} ms"
            " max {batch_max_ms} ms",
            "  beside it {consumer_during_backup_events_per_s:>10,} events/s  ratio {consumer_ratio}"
            " (CPU {consumer_cpu_ratio}), batch p99 {during_backup_batch_p99_ms} ms"
            " max {during_backup_batch_max_ms} ms",
            "backup      {backup_alone_s} s alone, {backup_beside_consumer_s} s beside the consumer; exact {exact}",
        ],
    )
