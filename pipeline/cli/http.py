"""`edgepipe serve` and `edgepipe tokens …`."""

from __future__ import annotations

import click

from pipeline.cli import State, emit_json, main, pass_state
from pipeline.errors import ConfigError


@main.command()
@click.option("--host", default=None, help="Address to bind (default: [http] host, 127.0.0.1).")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="Port (default: [http] port, 8787).")
@click.option("--consume", is_flag=True, help="Also run the consumer in this process (development).")
@pass_state
def serve(state: State, host: str | None, port: int | None, consume: bool) -> None:
    """Serve the HTTP API (POST /v1/events, the read API, /health, /ready, /metrics).

    Secure by default: bound to a non-loopback address, it refuses to start until an API
    token exists (`edgepipe tokens create`), and then every /v1 request needs one. On a
    loopback address with no token the API is open, for local development."""
    from pipeline.http.app import create_app, run_server
    from pipeline.http.auth import active_count, is_loopback

    cfg = state.config.http
    host = host or cfg.host
    port = cfg.port if port is None else port
    env = state.env()
    public = not is_loopback(host)
    if public and active_count(env.DB) == 0:
        raise ConfigError(
            f"refusing to serve on non-loopback address {host}: no API token exists; "
            "create one with `edgepipe tokens create` (or bind to 127.0.0.1)"
        )
    worker = None
    if consume:
        from pipeline.cli.compose import consumer_worker

        worker = consumer_worker(env)
    run_server(create_app(env, require_token=public, worker=worker), host, port)


@main.group()
def tokens() -> None:
    """API bearer tokens (stored as SHA-256 hashes; a token is shown once, at creation)."""


@tokens.command("create")
@click.option("--name", default="default", show_default=True, help="A label for the token.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tokens_create(state: State, name: str, as_json: bool) -> None:
    """Create a token and print it once; it cannot be shown again."""
    from pipeline.http.auth import create_token

    token_id, token = create_token(state.env().DB, name)
    if as_json:
        emit_json({"id": token_id, "name": name, "token": token})
    else:
        click.echo(token)
        click.echo(f"token {token_id} ({name}) created; store it now, it is not shown again", err=True)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tokens_list(state: State, as_json: bool) -> None:
    """List tokens (ids, names, dates; never the tokens)."""
    from pipeline.http.auth import list_tokens

    rows = list_tokens(state.env().DB)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        status = "active" if r["active"] else f"revoked {r['revoked_at']}"
        click.echo(f"{r['id']:>4}  {r['name']:<24} created {r['created_at']}  last used {r['last_used_at']}  {status}")


@tokens.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
@pass_state
def tokens_revoke(state: State, token_id: int) -> None:
    """Revoke a token by id (takes effect within a few seconds on running servers)."""
    from pipeline.http.auth import revoke_token

    revoke_token(state.env().DB, token_id)
    click.echo(f"token {token_id} revoked", err=True)
