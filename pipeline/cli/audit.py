"""`edgepipe audit`: the audit log."""

from __future__ import annotations

import click
import orjson

from pipeline.cli import State, emit_json, main, pass_state, print_table, time_option
from pipeline.errors import ValidationError

COLUMNS = ("at", "actor", "action", "outcome", "params", "client", "detail")
OPTIONAL = ("client", "detail")  # shown when a row has one


@main.command("audit")
@click.option("--since", metavar="T", help="Only rows at or after T (RFC 3339, a date or epoch seconds).")
@click.option("--until", metavar="T", help="Only rows before T.")
@click.option("--action", "action_name", metavar="A", help="Only this action (e.g. dlq.purge, jobs.run).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000),
              help="The newest N rows that match, printed oldest first.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="A JSON list of the rows, every field.")
@pass_state
def audit_cmd(state: State, since: str | None, until: str | None, action_name: str | None, limit: int,
              as_json: bool) -> None:  # fmt: skip
    """Who did what, when, with which parameters, and how it ended: DLQ redrives and
    purges, replay restores and rebuilds, manual job runs, backup restores, tokens created
    and revoked, failed authentication, the configuration each process started with."""
    from pipeline import audit

    lo, hi = time_option(since, "--since"), time_option(until, "--until")
    if lo is not None and hi is not None and hi <= lo:
        raise ValidationError("--until", "must be after --since")
    rows = audit.entries(state.env().DB, since=lo, until=hi, action_name=action_name, limit=limit, newest=True)
    if as_json:
        emit_json(rows)
        return
    shown = [r | {"at": r["at"][:19].replace("T", " "), "params": orjson.dumps(r["params"]).decode()} for r in rows]
    columns = [c for c in COLUMNS if c not in OPTIONAL or any(r[c] for r in rows)]
    print_table(shown, columns, f"audit log, {len(rows)} rows (UTC)")
