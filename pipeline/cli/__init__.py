"""`edgepipe` command line. Thin commands over the library; each area has its own module.

Importing this package loads click and the commands' definitions only: the configuration,
the bindings (SQLAlchemy, Alembic, boto3, FastAPI) and the workers are imported by the
commands that use them, so `edgepipe --help` starts fast.

Errors from edgepipe's hierarchy become one line on stderr and a non-zero exit code
(`ConfigError` 2, `ValidationError` 3, `BindingError` 4, `NotFound` 5, `IntegrityError` 6).
"""

from __future__ import annotations

import sys
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click

from pipeline import clock, log
from pipeline.errors import EdgepipeError, ValidationError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.env import Env


class State:
    """Lazily loaded configuration and bindings, shared by the sub-commands of one call."""

    def __init__(self, config_path: str | None, env_name: str | None, debug: bool = False) -> None:
        self.config_path = config_path
        self.env_name = env_name
        self.debug = debug
        self._env: Env | None = None

    @cached_property
    def config(self) -> Config:
        from pipeline.config import load

        return load(self.config_path, self.env_name)

    def env(self, check_schema: bool = True) -> Env:
        if self._env is None:
            from pipeline.env import open_env

            self._env = open_env(self.config, check_schema=check_schema)
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class App(click.Group):
    """Maps errors to one line on stderr and an exit code: edgepipe's own by their class, any
    other (a bug, an unmapped library error) to exit 1, its traceback logged at DEBUG and
    printed with `--debug`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgepipeError as exc:
            click.echo(f"edgepipe: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if isinstance(ctx.obj, State) and ctx.obj.debug:
                raise
            log.logger.debug("unexpected error", exc_info=True)
            text = " ".join(str(exc).split())[:500]
            click.echo(f"edgepipe: unexpected error: {type(exc).__name__}: {text} (--debug shows where)", err=True)
            ctx.exit(1)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", metavar="PATH", help="TOML config (else $EDGEPIPE_CONFIG, ./edgepipe.toml, defaults)."
)
@click.option("--env", "env_name", metavar="NAME", help="Named environment [env.NAME] (else $EDGEPIPE_ENV).")
@click.option(
    "--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])
)
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (and log at DEBUG).")
@click.version_option(package_name="edgepipe")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, env_name: str | None, log_level: str, debug: bool) -> None:
    """edgepipe: a self-hosted edge traffic pipeline."""
    log.setup("DEBUG" if debug else log_level)
    state = State(config_path, env_name, debug)
    ctx.obj = state
    ctx.call_on_close(state.close)


pass_state = click.make_pass_decorator(State)


HEADERS = {"requests": "req", "status_4xx": "4xx", "status_5xx": "5xx", "rt_avg_ms": "avg",
           "p50_ms": "p50", "p95_ms": "p95", "p99_ms": "p99", "received": "recv", "inserted": "new",
           "duplicates": "dup", "too_late": "late", "overflow": "over", "duplicate_rate": "dup %",
           "invalid_rate": "inv %"}  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str], title: str) -> None:
    """A terminal table of some fields; `--json` is the machine-readable form with all."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        numeric = any(type(r.get(c)) in (int, float) for r in rows)
        table.add_column(
            HEADERS.get(c, c), justify="right" if numeric else "left", overflow="fold" if c == "path" else "ellipsis"
        )
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    Console().print(table)


def time_option(value: str | None, name: str) -> float | None:
    """Epoch seconds of a `--from`/`--to`/`--at` value (RFC 3339, a date or epoch
    seconds); None when the option was not given; a ValidationError naming it when bad."""
    if value is None:
        return None
    try:
        return clock.parse_time(value)
    except ValueError as exc:
        raise ValidationError(name, str(exc)) from None


def emit_json(data: Any) -> None:
    import orjson

    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


from pipeline.bench import cli as bench  # noqa: E402  (registers `edgepipe bench`)
from pipeline.cli import (  # noqa: E402  (registers the commands)
    analytics,
    archive,
    audit,
    backup,
    core,
    demo,
    events,
    http,
    jobs,
    ops,
    quality,
    report,
)

__all__ = [
    "analytics",
    "archive",
    "audit",
    "backup",
    "bench",
    "core",
    "demo",
    "emit_json",
    "events",
    "http",
    "jobs",
    "main",
    "ops",
    "pass_state",
    "print_table",
    "quality",
    "report",
    "time_option",
]
