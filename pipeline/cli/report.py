"""`edgepipe report`: the dashboard as one self-contained HTML file, its data embedded; and
`pipeline_document`, the pipeline-health document of `GET /v1/pipeline` and of the
report, composed here (the CLI may import the workers; the HTTP app gets it as a callable)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline import clock
from pipeline.cli import State, emit_json, main, pass_state, time_option

if TYPE_CHECKING:
    from pipeline.env import Env


def pipeline_document(env: Env) -> dict[str, Any]:
    """Pipeline health in one document: `monitor` (what `edgepipe monitor --json` prints),
    `status` (`edgepipe status --json`), `jobs` (`edgepipe jobs list --json`), and the dead
    letters per reason, held now (`dlq_by_reason`) and for good (`rejected`)."""
    from pipeline import heartbeat
    from pipeline.cli.jobs import _job_rows  # registers the jobs the cron table is checked against
    from scheduler.monitor import report

    w = env.config.worker
    held = env.QUEUE.stats()
    return {
        "generated_at": clock.iso(int(clock.now_s())),
        "monitor": report(env),
        "status": heartbeat.status(env.DB, env.QUEUE.depth(), dead_after=w.dead_after, forget_after=w.forget_after),
        "jobs": _job_rows(env),
        "dlq_by_reason": {k.removeprefix("dlq_"): n for k, n in held.items() if k.startswith("dlq_")},
        "rejected": env.QUEUE.rejected_totals(),
    }


def report_data(env: Env, start: float | None, end: float | None, host: str | None, limit: int) -> dict[str, Any]:
    """What the report embeds: the overview of the range, the view of each of its top paths,
    the data quality of the range's hours and the pipeline's health now."""
    from pipeline import overview, quality

    doc = overview.overview(env.DB, start, end, host, None, limit)
    paths = {p["path"]: overview.overview(env.DB, start, end, host, p["path"], 1) for p in doc["paths"]}
    last = clock.parse_time(doc["to"]) - 1
    hours = min(math.ceil((last + 1 - clock.parse_time(doc["from"])) / 3600), 24 * 366)
    return {
        "report": {"generated_at": clock.iso(int(clock.now_s())), "from": doc["from"], "to": doc["to"], "host": host},
        "overview": doc,
        "paths": paths,
        "quality": quality.report(env.DB, hours, now_s=last),
        "pipeline": pipeline_document(env),
    }


@main.command("report")
@click.option("--from", "start", metavar="T", help="Start (RFC 3339, date, epoch s); default: 24 h before --to.")
@click.option("--to", "end", metavar="T", help="End, exclusive; default: the end of the current hour.")
@click.option("--host", metavar="H", help="Only this host.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="Top paths shown.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write.")
@click.option("--json", "as_json", is_flag=True, help='Print {"out", "bytes", "from", "to"}.')
@pass_state
def report_cmd(
    state: State, start: str | None, end: str | None, host: str | None, limit: int, out: Path, as_json: bool
) -> None:
    """Write the dashboard of a range (tiles, charts, top paths and their views, data
    quality, pipeline health) as one self-contained HTML file to mail or archive: scripts,
    styles and data inlined, readable offline. Prints the path written."""
    from pipeline.files import write_atomic
    from pipeline.http.dashboard import standalone_html

    data = report_data(state.env(), time_option(start, "--from"), time_option(end, "--to"), host, limit)
    size = write_atomic(out, standalone_html(data).encode())
    if as_json:
        emit_json({"out": str(out), "bytes": size, "from": data["report"]["from"], "to": data["report"]["to"]})
    else:
        click.echo(str(out))
