"""TLS and proxies through a real `edgepipe serve`: a self-signed certificate made in the
test, `https://127.0.0.1:PORT/health` answered with it trusted, plain HTTP refused, and
behind a (trusted) proxy the audit log records the client's forwarded address."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pipeline import audit
from pipeline.config import Config
from pipeline.env import open_env
from tests.http_support import SERVE_DEADLINE_S, edgepipe_cmd, free_port, serving
from tests.tls_support import self_signed

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    db = f"sqlite:///{tmp_path}/e.db"
    cfg = tmp_path / "edgepipe.toml"
    cfg.write_text(f'[bindings]\ndb = "{db}"\narchive = "file://{tmp_path}/archive"\n')
    subprocess.run(edgepipe_cmd(cfg, "init"), check=True, capture_output=True, timeout=SERVE_DEADLINE_S)
    created = subprocess.run(edgepipe_cmd(cfg, "tokens", "create", "reader", "--scope", "read", "--json"),
                             check=True, capture_output=True, timeout=SERVE_DEADLINE_S)  # fmt: skip
    cert, key = self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    args = ["--port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
            "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"]  # fmt: skip
    base = f"https://127.0.0.1:{port}"
    with httpx.Client(verify=trusted, timeout=1) as poller, serving(cfg, base, *args, client=poller):
        yield {"port": port, "trusted": trusted, "token": orjson.loads(created.stdout)["token"], "db": db,
               "log": tmp_path / "serve.log"}  # fmt: skip


def test_https_with_the_certificate_trusted_and_plain_http_refused(tls_server: dict[str, Any]) -> None:
    port, token = tls_server["port"], tls_server["token"]
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=tls_server["trusted"], timeout=10) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/stats", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/v1/stats").status_code == 401
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted: it is self-signed
        httpx.get(f"https://127.0.0.1:{port}/health", timeout=10)
    assert token not in tls_server["log"].read_text()


def test_behind_a_trusted_proxy_the_audit_log_records_the_forwarded_client(tls_server: dict[str, Any]) -> None:
    port = tls_server["port"]
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=tls_server["trusted"], timeout=10) as c:
        forwarded = {"authorization": "Bearer ep_stolen-or-mistyped", "x-forwarded-for": "203.0.113.9"}
        assert c.get("/v1/jobs", headers=forwarded).status_code == 401
    env = open_env(Config().replace(bindings={"db": tls_server["db"]}))
    try:
        failed = audit.entries(env.DB, action_name="auth.failed")
        loaded = audit.entries(env.DB, action_name="config.loaded")
    finally:
        env.close()
    assert [(r["client"], r["actor"], r["params"]["reason"]) for r in failed] == [
        ("203.0.113.9", "anonymous", "unknown")
    ]
    assert "ep_stolen" not in str(failed)
    assert [r["params"]["options"] for r in loaded] == [
        ["http.forwarded_allow_ips", "http.port", "http.proxy_headers", "http.ssl_certfile", "http.ssl_keyfile"]
    ]
