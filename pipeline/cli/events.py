"""`edgepipe events`: the hot detail rows (`pipeline.detail`), newest first."""

from __future__ import annotations

import click

from pipeline.cli import State, emit_json, main, pass_state, print_table, time_option
from pipeline.errors import ValidationError

MAX_LIMIT = 10_000
COLUMNS = ("ts", "method", "status", "ms", "host", "path")


@main.command("events")
@click.option("--since", metavar="T", help="Rows at or after T (RFC 3339, a date or epoch seconds).")
@click.option("--until", metavar="T", help="Rows before T.")
@click.option("--path", metavar="P", help="Only this path (normalised as the consumer normalises paths).")
@click.option("--method", metavar="M", help="Only this method (any case).")
@click.option("--status", metavar="S", help="Only this status code (404) or class (5xx).")
@click.option("--host", metavar="H", help="Only this host.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, MAX_LIMIT), help="Rows per page.")
@click.option("--cursor", metavar="C", help="Go on after the page that printed this cursor.")
@click.option("--json", "as_json", is_flag=True, help='{"rows": [...], "next": cursor or null}, every field.')
@pass_state
def events_cmd(
    state: State,
    since: str | None,
    until: str | None,
    path: str | None,
    method: str | None,
    status: str | None,
    host: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """The hot detail rows (the last `[retention] detail_days` days), newest first, that
    match every filter given: read from the (ts, id) index, never a scan of the table.
    Without --since, from the newest row back to the oldest still held, stopping after
    --limit rows; when more match, the cursor of the next page is printed (on stderr)."""
    from pipeline import detail
    from pipeline.cursor import decode_cursor, encode_cursor
    from pipeline.paths import PathNormalizer

    f = detail.filters(
        PathNormalizer(state.config.paths),
        since=time_option(since, "--since"),
        until=time_option(until, "--until"),
        path=path,
        method=method,
        status=status,
        host=host,
        prefix="--",
    )
    try:
        key = decode_cursor(cursor, (int, str))
        after = None if key is None else detail.check_cursor(key)
    except ValidationError:
        raise ValidationError("--cursor", "not a cursor printed by `edgepipe events`") from None
    page = detail.page(state.env().DB, f, limit, after)
    nxt = None if page.next is None else encode_cursor(list(page.next))
    if as_json:
        emit_json({"rows": page.rows, "next": nxt})
        return
    shown = [r | {"ts": r["ts"].replace("T", " ").rstrip("Z"), "ms": r["response_time_ms"]} for r in page.rows]
    print_table(shown, COLUMNS, f"events, {len(shown)} rows, newest first (UTC)")
    if nxt is not None:
        click.echo(f"more rows: --cursor {nxt}", err=True)
