"""`edgepipe quality`: per-hour data quality (`pipeline.quality`)."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli import State, emit_json, main, pass_state, print_table

COLUMNS = ("hour", "received", "inserted", "duplicates", "invalid", "too_late", "overflow", "duplicate_rate",
           "invalid_rate")  # fmt: skip


def _shown(row: dict[str, Any], hour: str) -> dict[str, Any]:
    """A row for the table: a short hour, rates as percentages."""
    return {**row, "hour": hour, **{k: f"{row[k] * 100:.2f}" for k in ("duplicate_rate", "invalid_rate")}}


@main.command("quality")
@click.option("--hours", default=24, show_default=True, type=click.IntRange(1, 24 * 366))
@click.option("--json", "as_json", is_flag=True)
@pass_state
def quality_cmd(state: State, hours: int, as_json: bool) -> None:
    """Data quality of the last HOURS hours: events received, inserted, duplicates, invalid
    (by the field named), too late and overflowed, per hour the consumer handled them."""
    from pipeline import quality

    doc = quality.report(state.env().DB, hours)
    if as_json:
        emit_json(doc)
        return
    rows = [_shown(r, r["hour"][5:16].replace("T", " ")) for r in doc["rows"] if r["received"]]
    print_table([*rows, _shown(doc["totals"], "total")], COLUMNS, f"data quality, last {hours} h (UTC)")
    reasons = doc["totals"]["invalid_by_reason"]
    if reasons:
        click.echo("invalid by field: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
