"""`edgepipe tokens create|list|revoke` with scopes and expiry, the audit row each leaves;
`edgepipe serve` start-up checks (TLS files, the warning without TLS, the `config.loaded`
row, what reaches uvicorn); `GET /v1/audit` and its paging. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

import pipeline.http.app as app_mod
from pipeline import audit, clock, config
from pipeline.cli.http import SCOPE_CHOICES
from pipeline.env import Env
from pipeline.http.app import create_app
from pipeline.http.auth import SCOPES, create_token
from tests.conftest import run_cli
from tests.http_support import client_for
from tests.tls_support import encrypted_key, self_signed

ME = audit.cli_actor().name


def cli(env: Env, *args: str, code: int = 0) -> Any:
    result = run_cli(env, *args)
    assert result.exit_code == code, result.output
    return result


def audit_rows(env: Env) -> list[dict[str, Any]]:
    return audit.entries(env.DB, limit=100_000)


def test_create_with_name_scope_and_expiry_leaves_one_audit_row(env: Env) -> None:
    with freeze_time("2026-11-19T12:00:00Z"):
        out = cli(env, "tokens", "create", "gateway", "--scope", "ingest", "--expires-in", "90d", "--json")
    created = orjson.loads(out.stdout)
    assert set(created) == {"id", "name", "scope", "expires_at", "token"}
    assert (created["name"], created["scope"], created["expires_at"]) == ("gateway", "ingest", "2027-02-17T12:00:00Z")
    assert created["token"].startswith("ep_")
    [row] = audit_rows(env)
    assert (row["actor"], row["action"], row["outcome"], row["client"]) == (ME, "tokens.create", "ok", None)
    assert row["params"] == {"name": "gateway", "scope": "ingest", "expires_at": "2027-02-17T12:00:00Z",
                             "id": created["id"]}  # fmt: skip
    assert created["token"] not in str(row)


def test_name_positional_or_legacy_option_and_defaults(env: Env) -> None:
    legacy = orjson.loads(cli(env, "tokens", "create", "--name", "old-script", "--json").stdout)
    bare = cli(env, "tokens", "create")
    assert (legacy["name"], legacy["scope"], legacy["expires_at"]) == ("old-script", "admin", None)
    assert bare.stdout.strip().startswith("ep_") and bare.stdout.count("\n") == 1  # only the token on stdout
    assert "(default, scope admin, never expires)" in bare.stderr
    assert "--name" not in cli(env, "tokens", "create", "--help").stdout  # a hidden alias
    both = cli(env, "tokens", "create", "a", "--name", "b", code=2)
    assert "two names" in both.stderr
    assert [r["action"] for r in audit_rows(env)] == ["tokens.create", "tokens.create"]


def test_bad_duration_or_scope_is_one_line_and_no_row(env: Env) -> None:
    bad = cli(env, "tokens", "create", "x", "--expires-in", "3 weeks", code=3)
    assert bad.stderr.count("\n") == 1 and "expires-in" in bad.stderr and "90d" in bad.stderr
    cli(env, "tokens", "create", "x", "--scope", "root", code=2)
    assert audit_rows(env) == []
    assert SCOPE_CHOICES == SCOPES


def test_list_shows_scope_state_expiry_and_last_use(env: Env) -> None:
    with freeze_time("2026-11-19T12:00:00Z") as frozen:
        cli(env, "tokens", "create", "reader", "--scope", "read", "--expires-in", "1h")
        cli(env, "tokens", "create", "admin")
        frozen.move_to("2026-11-19T13:00:00Z")
        rows = orjson.loads(cli(env, "tokens", "list", "--json").stdout)
        text = cli(env, "tokens", "list").stdout
    assert set(rows[0]) == {"id", "name", "scope", "created_at", "expires_at", "revoked_at", "last_used_at",
                            "state", "active"}  # fmt: skip
    assert [(r["name"], r["scope"], r["state"], r["active"]) for r in rows] == [
        ("reader", "read", "expired", False),
        ("admin", "admin", "active", True),
    ]
    assert rows[0]["expires_at"] == "2026-11-19T13:00:00Z" and rows[1]["expires_at"] is None
    assert "expired" in text and "read" in text and "last used never" in text
    assert "ep_" not in text


def test_revoke_leaves_one_row_each_time_and_a_failed_one_for_an_unknown_id(env: Env) -> None:
    token_id = orjson.loads(cli(env, "tokens", "create", "gw", "--json").stdout)["id"]
    first = orjson.loads(cli(env, "tokens", "revoke", str(token_id), "--json").stdout)
    again = cli(env, "tokens", "revoke", str(token_id))
    missing = cli(env, "tokens", "revoke", "999", code=5)
    assert first == {"id": token_id, "revoked": True, "changed": True}
    assert "(already)" in again.stderr and "999" in missing.stderr
    revokes = [r for r in audit_rows(env) if r["action"] == "tokens.revoke"]
    assert [(r["actor"], r["params"], r["outcome"]) for r in revokes] == [
        (ME, {"id": token_id, "changed": True}, "ok"),
        (ME, {"id": token_id, "changed": False}, "ok"),
        (ME, {"id": 999}, "failed"),
    ]
    assert "NotFound" in revokes[-1]["detail"]
    assert orjson.loads(cli(env, "tokens", "list", "--json").stdout)[0]["state"] == "revoked"


# -- serve start-up -------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `serve` would have served: run_server's arguments, instead of a server."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(app_mod, "run_server", lambda app, host, port, **kw: calls.append(
        {"app": app, "host": host, "port": port, **kw}))  # fmt: skip
    return calls


def test_serve_records_the_configuration_it_loaded(env: Env, served: list[dict[str, Any]]) -> None:
    cli(env, "serve")
    cli(env, "serve", "--port", "9999")
    rows = audit_rows(env)
    assert [(r["actor"], r["action"], r["outcome"]) for r in rows] == [("system", "config.loaded", "ok")] * 2
    b = env.config.bindings
    environ = {"EDGEPIPE_BINDINGS__DB": b.db, "EDGEPIPE_BINDINGS__ARCHIVE": b.archive,
               "EDGEPIPE_CLEANER__STATS_FILE": env.config.cleaner.stats_file}  # fmt: skip
    loaded = config.load(environ=dict(os.environ) | environ)  # what the command loaded: run_cli sets these
    assert rows[0]["params"] == {"command": "serve", "source": loaded.source, "sha256": audit.config_digest(loaded)}
    assert rows[1]["params"] == {"command": "serve", "source": loaded.source, "options": ["http.port"],
                                 "sha256": audit.config_digest(loaded.replace(http={"port": 9999}))}  # fmt: skip
    assert rows[0]["params"]["sha256"] != rows[1]["params"]["sha256"]
    assert served[1]["port"] == 9999 and not served[1]["transport"].tls


def test_serve_public_without_tls_warns_and_with_tls_does_not(
    env: Env, served: list[dict[str, Any]], tmp_path: Path
) -> None:
    create_token(env.DB, "gw")
    plain = cli(env, "serve", "--host", "0.0.0.0", "--proxy-headers", "--forwarded-allow-ips", "10.0.0.5")
    assert "WARNING: serving plain HTTP on non-loopback address 0.0.0.0" in plain.stderr
    cert, key = self_signed(tmp_path)
    tls = cli(env, "serve", "--host", "0.0.0.0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    assert "WARNING" not in tls.stderr
    first, second = served[0]["transport"], served[1]["transport"]
    assert (first.proxy_headers, first.forwarded_allow_ips, first.tls) == (True, "10.0.0.5", False)
    assert (second.ssl_certfile, second.ssl_keyfile, second.proxy_headers) == (str(cert), str(key), False)
    assert all(call["app"].state.tokens.always_required for call in served)


@pytest.mark.parametrize(
    "problem", ["missing cert", "missing key", "not pem", "wrong key", "encrypted key", "key only"]
)
def test_serve_refuses_tls_files_that_do_not_load(
    problem: str, sqlite_url: str, make_env: Any, served: list[dict[str, Any]], tmp_path: Path
) -> None:
    env = make_env(sqlite_url)
    cert, key = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    args = {
        "missing cert": ["--ssl-certfile", str(tmp_path / "nope.crt"), "--ssl-keyfile", str(key)],
        "missing key": ["--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "nope.key")],
        "not pem": ["--ssl-certfile", str(junk), "--ssl-keyfile", str(key)],
        "wrong key": ["--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key)],
        "encrypted key": ["--ssl-certfile", str(cert), "--ssl-keyfile", str(encrypted_key(key))],
        "key only": ["--ssl-keyfile", str(key)],
    }[problem]
    result = cli(env, "serve", *args, code=2)
    assert result.stderr.startswith("edgepipe: config error") and result.stderr.count("\n") == 1, result.stderr
    assert served == [] and audit_rows(env) == []


def test_run_server_hands_tls_and_proxy_settings_to_uvicorn(
    make_env: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    import uvicorn

    from pipeline.http.transport import Transport

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    transport = Transport("/etc/cert.pem", "/etc/key.pem", True, "10.0.0.1,10.0.0.2")
    try:
        app_mod.run_server(create_app(make_env(sqlite_url)), "127.0.0.1", 8787, transport=transport)
    finally:
        gc.unfreeze()
    assert {k: seen[k] for k in ("ssl_certfile", "ssl_keyfile", "proxy_headers", "forwarded_allow_ips")} == {
        "ssl_certfile": "/etc/cert.pem",
        "ssl_keyfile": "/etc/key.pem",
        "proxy_headers": True,
        "forwarded_allow_ips": "10.0.0.1,10.0.0.2",
    }


# -- GET /v1/audit ----------------------------------------------------------------------------


def _write(env: Env, at: float, action: str, n: int) -> None:
    with freeze_time(clock.iso(at)), env.DB.transaction() as conn:
        audit.record(env.DB, conn, audit.SYSTEM, action, {"n": n})


async def _pages(c: Any, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        r = await c.get("/v1/audit", params=params | ({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        pages.append(r.json()["rows"])
        cursor = r.json()["next"]
        if cursor is None:
            return pages


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_audit_api_filters_and_pages_by_cursor(env: Env) -> None:
    base = 1_790_000_000.0
    for n in range(25):
        _write(env, base + n * 0.5, "tokens.create" if n % 3 else "dlq.redrive", n)
    _write(env, base + 7.0, "dlq.redrive", 25)  # written later by a process whose clock is behind
    _, token = create_token(env.DB, "auditor", "admin")
    async with client_for(create_app(env), token) as c:
        pages = await _pages(c, limit=4)
        everything = (await c.get("/v1/audit")).json()
        redrives = await _pages(c, action="dlq.redrive", limit=3)
        since = (await c.get("/v1/audit", params={"since": clock.iso(base + 10)})).json()["rows"]
        bad = await c.get("/v1/audit", params={"cursor": "nope"})
    flat = [r["params"]["n"] for page in pages for r in page]
    assert flat == list(range(26)) and [len(p) for p in pages] == [4] * 6 + [2]
    assert everything["next"] is None and [r["params"]["n"] for r in everything["rows"]] == flat
    assert [r["params"]["n"] for p in redrives for r in p] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert [r["params"]["n"] for r in since] == list(range(20, 25))
    assert bad.status_code == 400 and bad.json()["detail"].startswith("cursor:")
    assert set(everything["rows"][0]) == {"seq", "at", "actor", "token_id", "action", "params", "outcome", "detail",
                                          "client"}  # fmt: skip
