"""How the example configurations expose the HTTP API, and docs/deploy.md: every config in
infra/ (every environment) binds to loopback, or to other interfaces only with TLS; the
production one sits behind a trusted local proxy; every `edgepipe …` the deployment guide
shows names a real command and options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import config
from pipeline.http.auth import is_loopback
from tests.test_infra_configs import CASES, INFRA, ROOT, _check_invocation, _shell_invocations

DEPLOY_DOC = ROOT / "docs" / "deploy.md"


@pytest.mark.parametrize(("path", "env"), CASES, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_public_only_with_tls(path: Path, env: str | None) -> None:
    http = config.load(path, env=env, environ={}).http
    assert is_loopback(http.host) or (http.ssl_certfile and http.ssl_keyfile), (path.name, env, http.host)
    assert http.forwarded_allow_ips.strip() != "*"


def test_production_is_behind_a_local_proxy() -> None:
    http = config.load(INFRA / "production.toml", environ={}).http
    assert is_loopback(http.host) and http.proxy_headers
    assert all(is_loopback(ip.strip()) for ip in http.forwarded_allow_ips.split(","))
    assert http.rate_limit_per_s > 0


def _doc_invocations(text: str) -> list[list[str]]:
    blocks = re.findall(r"```(?:sh|toml)?\n(.*?)```", text, re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    calls = [call for line in lines for call in _shell_invocations(line)]
    return [[w for word in call if (w := word.strip("[]"))] for call in calls]  # `[--opt V]`: optional


def test_the_deployment_guide_names_real_commands() -> None:
    calls = _doc_invocations(DEPLOY_DOC.read_text(encoding="utf-8"))
    assert ["tokens", "create", "gateway", "--scope", "ingest", "--expires-in", "90d"] in calls
    assert any(call[:1] == ["serve"] for call in calls)
    problems = [(call, why) for call in calls if (why := _check_invocation(call))]
    assert not problems, problems
    assert _check_invocation(["tokens", "create", "x", "--scop", "read"])  # the check can fail
