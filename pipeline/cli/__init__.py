"""`edgepipe` command line. Thin commands over the library; each area has its own module.

Errors from edgepipe's hierarchy become one line on stderr and a non-zero exit code
(`ConfigError` 2, `ValidationError` 3, `BindingError` 4, `NotFound` 5, `IntegrityError` 6).
"""

from __future__ import annotations

import sys
from functools import cached_property
from typing import Any

import click

from pipeline import config as config_mod
from pipeline import log
from pipeline.env import Env, open_env
from pipeline.errors import EdgepipeError


class State:
    """Lazily loaded configuration and bindings, shared by the sub-commands of one call."""

    def __init__(self, config_path: str | None, env_name: str | None) -> None:
        self.config_path = config_path
        self.env_name = env_name
        self._env: Env | None = None

    @cached_property
    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path, self.env_name)

    def env(self, check_schema: bool = True) -> Env:
        if self._env is None:
            self._env = open_env(self.config, check_schema=check_schema)
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class App(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgepipeError as exc:
            click.echo(f"edgepipe: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", metavar="PATH", help="TOML config (else $EDGEPIPE_CONFIG, ./edgepipe.toml, defaults)."
)
@click.option("--env", "env_name", metavar="NAME", help="Named environment [env.NAME] (else $EDGEPIPE_ENV).")
@click.option(
    "--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])
)
@click.version_option(package_name="edgepipe")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, env_name: str | None, log_level: str) -> None:
    """edgepipe: a self-hosted edge traffic pipeline."""
    log.setup(log_level)
    state = State(config_path, env_name)
    ctx.obj = state
    ctx.call_on_close(state.close)


pass_state = click.make_pass_decorator(State)


def emit_json(data: Any) -> None:
    import orjson

    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


from pipeline.cli import archive, bench, core, http, jobs, ops  # noqa: E402  (registers the commands)

__all__ = ["archive", "bench", "core", "emit_json", "http", "jobs", "main", "ops", "pass_state"]
