"""`edgepipe serve` and `edgepipe tokens …`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from pipeline import clock, log
from pipeline.cli import State, emit_json, main, pass_state
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.env import Env
    from pipeline.http.transport import Transport

SCOPE_CHOICES = ("ingest", "read", "admin")  # pipeline.http.auth.SCOPES, without importing the HTTP stack


@main.command()
@click.option("--host", default=None, help="Address to bind (default: [http] host, 127.0.0.1).")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="Port (default: [http] port, 8787).")
@click.option("--consume", is_flag=True, help="Also run the consumer in this process (development).")
@click.option("--ssl-certfile", metavar="PEM", default=None, help="Serve HTTPS with this certificate (chain).")
@click.option("--ssl-keyfile", metavar="PEM", default=None, help="The certificate's private key (unencrypted).")
@click.option(
    "--proxy-headers/--no-proxy-headers",
    default=None,
    help="Take the client's address from X-Forwarded-For, sent by --forwarded-allow-ips only.",
)
@click.option("--forwarded-allow-ips", metavar="IPS", default=None, help="Comma-separated trusted proxies ('*': any).")
@pass_state
def serve(
    state: State,
    host: str | None,
    port: int | None,
    consume: bool,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    proxy_headers: bool | None,
    forwarded_allow_ips: str | None,
) -> None:
    """Serve the HTTP API (POST /v1/events, the read API, /health, /ready, /metrics).

    Secure by default: bound to a non-loopback address or behind a proxy
    (--proxy-headers), it refuses to start until an API token exists (`edgepipe tokens
    create`), and then every request but /health and /ready needs one; on a non-loopback
    address without TLS it warns that tokens and data cross the network in clear text. On
    a loopback address with no token and no proxy the API is open, for local development."""
    from pipeline.http.app import create_app, run_server
    from pipeline.http.transport import Transport

    given = {"host": host, "port": port, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
             "proxy_headers": proxy_headers, "forwarded_allow_ips": forwarded_allow_ips}  # fmt: skip
    overrides = {k: v for k, v in given.items() if v is not None}
    config = state.config.replace(http=overrides) if overrides else state.config
    cfg = config.http
    transport = Transport.from_config(cfg)
    transport.check()
    env = state.env()
    require_token = _check_exposure(env, cfg.host, cfg.port, transport)
    _audit_config(env, config, sorted(overrides))
    worker = None
    if consume:
        from pipeline.cli.compose import consumer_worker

        worker = consumer_worker(env)
    from pipeline.cli.report import pipeline_document

    app = create_app(env, require_token=require_token, worker=worker, pipeline_report=pipeline_document)
    run_server(app, cfg.host, cfg.port, transport=transport)


def _check_exposure(env: Env, host: str, port: int, transport: Transport) -> bool:
    """Whether the server is reachable from other machines (a non-loopback address, or a
    proxy in front): then it must insist on tokens, and refuses to start without one. Warns
    about plain HTTP on a non-loopback address."""
    from pipeline.http.auth import active_count, is_loopback

    exposed_at = f"non-loopback address {host}" if not is_loopback(host) else None
    if exposed_at is None and transport.proxy_headers:
        exposed_at = f"{host} behind a proxy (proxy_headers)"
    if exposed_at is None:
        return False
    if active_count(env.DB) == 0:
        raise ConfigError(
            f"refusing to serve on {exposed_at}: no API token exists; "
            "create one with `edgepipe tokens create NAME --scope …` (or bind to 127.0.0.1 without a proxy)"
        )
    if not is_loopback(host) and not transport.tls:
        click.echo(
            f"edgepipe: WARNING: serving plain HTTP on non-loopback address {host}: API tokens and data "
            "cross the network unencrypted; set [http] ssl_certfile/ssl_keyfile, or bind to 127.0.0.1 "
            "behind a TLS-terminating proxy (docs/deploy.md)",
            err=True,
        )
        log.event("serve_without_tls", logging.WARNING, host=host, port=port)
    return True


def _audit_config(env: Env, config: Config, overridden: list[str]) -> None:
    """One `config.loaded` row: where the configuration came from and a digest of it as
    validated (the command-line options included), so a change between starts shows."""
    from pipeline import audit

    options = {"options": [f"http.{k}" for k in overridden]} if overridden else {}
    audit.config_loaded(env.DB, config, "serve", **options)


@main.group()
def tokens() -> None:
    """API bearer tokens with a scope (stored as SHA-256 hashes; a token is shown once, at
    creation). Scopes: `ingest` posts events; `read` reads the /v1 API and /metrics;
    `admin` does both and reads the audit log."""


@tokens.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", default=None, hidden=True, help="Same as NAME (kept for older scripts).")
@click.option(
    "--scope",
    type=click.Choice(SCOPE_CHOICES),
    default="admin",
    show_default=True,
    help="ingest: POST /v1/events; read: GET /v1/* but the audit log, and /metrics; admin: everything.",
)
@click.option("--expires-in", metavar="DURATION", default=None, help="e.g. 90d, 12h, 30m, 3600s (default: never).")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tokens_create(
    state: State, name: str | None, name_option: str | None, scope: str, expires_in: str | None, as_json: bool
) -> None:
    """Create a token NAME (default `default`) and print it once; it cannot be shown again."""
    from pipeline import audit
    from pipeline.http.auth import create_token, parse_duration

    if name and name_option and name != name_option:
        raise click.UsageError(f"two names given: {name!r} and --name {name_option!r}")
    name = name or name_option or "default"
    expires_at = clock.now_s() + parse_duration(expires_in) if expires_in else None
    db = state.env().DB
    params = {"name": name, "scope": scope, "expires_at": clock.iso(expires_at) if expires_at else None}
    with audit.action(db, audit.cli_actor(), "tokens.create", params) as result:
        token_id, token = create_token(db, name, scope, expires_at)
        result["id"] = token_id
    if as_json:
        emit_json({"id": token_id, "name": name, "scope": scope, "expires_at": params["expires_at"], "token": token})
    else:
        click.echo(token)
        until = f"expires {params['expires_at']}" if expires_at else "never expires"
        click.echo(f"token {token_id} ({name}, scope {scope}, {until}) created; store it now, it is not shown again",
                   err=True)  # fmt: skip


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tokens_list(state: State, as_json: bool) -> None:
    """List tokens: id, name, scope, state, expiry, last use (never the tokens)."""
    from pipeline.http.auth import list_tokens

    rows = list_tokens(state.env().DB)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        status = f"revoked {r['revoked_at']}" if r["revoked_at"] else r["state"]
        expires = f"expires {r['expires_at']}" if r["expires_at"] else "no expiry"
        used = r["last_used_at"] or "never"
        click.echo(f"{r['id']:>4}  {r['name']:<24} {r['scope']:<6}  {status:<32}  {expires:<32}  last used {used}")


@tokens.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tokens_revoke(state: State, token_id: int, as_json: bool) -> None:
    """Revoke a token by id (takes effect within a few seconds on running servers)."""
    from pipeline import audit
    from pipeline.http.auth import revoke_token

    db = state.env().DB
    with audit.action(db, audit.cli_actor(), "tokens.revoke", {"id": token_id}) as result:
        result["changed"] = revoke_token(db, token_id)
    if as_json:
        emit_json({"id": token_id, "revoked": True, "changed": result["changed"]})
    else:
        click.echo(f"token {token_id} revoked" + ("" if result["changed"] else " (already)"), err=True)
