"""`edgepipe replay sql`: SQL over the archive objects of a range, with DuckDB (the optional
extra `edgepipe[analytics]`; the logic is `archiver.sql`).

The objects are read as every replay command reads them (a truncated or corrupt object is
named on stderr and skipped, the query runs over the others, and the command exits 6);
duckdb is imported only when the command runs, so `edgepipe --help` and every other
command work without the extra.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from pipeline import clock
from pipeline.cli import State, pass_state, print_table
from pipeline.cli.archive import _archive, _checked_range, _finish_quiet, _object_progress, _retention_notes, replay
from pipeline.cli.archive import with_range as _with_range
from pipeline.errors import ValidationError

# The schema is written out here rather than built from `archiver.sql.COLUMNS`: importing
# the archiver would slow down every `edgepipe` command. A test checks the two agree.
HELP = """Run SQL over a table `events` made of the archive objects of the range.

The objects of the range are fetched through the ARCHIVE binding and checked like every
replay command checks them, then loaded into a DuckDB database held in memory for this
command and discarded after it (nothing is written back). `events` holds the archived
rows with --from <= ts < --to:

\b
  seq               BIGINT     the row's seq in traffic_events
  ts                TIMESTAMP  event time, UTC (no zone attached), ms precision
  ts_ms             BIGINT     event time as stored: epoch milliseconds
  id                VARCHAR    event id
  method            VARCHAR    HTTP method
  path              VARCHAR    normalised path
  overflow          SMALLINT   1: counted as __other__ in the aggregates, else 0
  status            SMALLINT   HTTP status (its class: status // 100)
  response_time_ms  DOUBLE     response time in ms
  host              VARCHAR    host ('' when none was given)
  colo              VARCHAR    edge location, NULL when none was given
  bytes             BIGINT     response bytes, NULL when none were given
  dt                DATE       UTC day of the object (Hive key dt=)
  hour              INTEGER    UTC hour of the object, 0-23 (Hive key hour=)

An empty range gives an empty `events`. Output: a table; --json an object
{"columns": [names], "rows": [{column: value}]}; --csv CSV with a header. Timestamps are
RFC 3339 in UTC. Needs the analytics extra: pip install 'edgepipe[analytics]'.

\b
  edgepipe replay sql "SELECT path, count(*) AS n FROM events GROUP BY path ORDER BY n DESC" \\
      --from 2026-11-17 --to 2026-11-18
"""


@replay.command("sql", help=HELP)
@click.argument("statement", metavar="SQL")
@_with_range
@click.option("--json", "as_json", is_flag=True, help="An object with `columns` and `rows` (objects).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line.")
@pass_state
def replay_sql(state: State, statement: str, start: str | None, end: str | None, as_json: bool,
               as_csv: bool) -> None:  # fmt: skip
    from archiver import replay as r
    from archiver import sql

    if as_json and as_csv:
        raise ValidationError("--csv", "cannot be combined with --json")
    sql.duckdb_module()  # without the extra: one line, exit 2, before anything is read
    env, store, prefix = _archive(state)
    lo, hi = _checked_range(start, end)
    bad: list[dict[str, str]] = []
    with _object_progress(False) as progress, sql.open_events(store, prefix, lo, hi, bad, progress) as loaded:
        click.echo(f"events: {loaded.rows:,} rows from {loaded.objects} objects, {clock.iso(lo)} to {clock.iso(hi)}",
                   err=True)  # fmt: skip
        result = sql.query(loaded.con, statement)
        if as_csv:
            _print_csv(result)
        else:
            if (twice := result.duplicate_column()) is not None:
                raise ValidationError("SQL", f"the result has two columns named {twice!r}: name them apart (AS …)")
            if as_json:
                _print_json(result)
            else:
                rows = [{c: sql.plain(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows()]
                print_table(rows, result.columns, f"{len(rows):,} rows")
    _retention_notes({"expired_hours": r.expired_hours(env.DB, lo, hi)})
    _finish_quiet({"ok": not bad, "bad": bad})


def _print_csv(result: Any) -> None:
    from archiver.sql import csv_text

    click.echo(csv_text([], result.columns), nl=False)
    for chunk in result.chunks:
        click.echo(csv_text(chunk), nl=False)


def _print_json(result: Any) -> None:
    """{"columns": [...], "rows": [{...}, ...]}, a row a line, streamed chunk by chunk."""
    from archiver.sql import plain

    columns = result.columns
    click.echo('{"columns": ' + orjson.dumps(columns).decode() + ', "rows": [', nl=False)
    first = True
    for chunk in result.chunks:
        lines = [orjson.dumps({c: plain(v) for c, v in zip(columns, row, strict=True)}).decode() for row in chunk]
        if lines:
            click.echo(("\n" if first else ",\n") + ",\n".join(lines), nl=False)
            first = False
    click.echo("\n]}" if not first else "]}")
    sys.stdout.flush()
