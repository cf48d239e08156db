"""The example configs in infra/ load and validate in every environment they define, hold no
secrets, and the deployment files point at commands that exist."""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.env import ARCHIVE_BACKENDS

INFRA = Path(__file__).resolve().parent.parent / "infra"
CONFIGS = sorted(INFRA.glob("*.toml"))
CASES = [
    (path, env)
    for path in CONFIGS
    for env in (None, *sorted(tomllib.loads(path.read_text(encoding="utf-8")).get("env", {})))
]
# credentials in a URL, or a password / secret / key / token assigned a literal value
SECRET = re.compile(
    r"://[^/@\s:]+:[^/@\s]+@|(password|secret|access_key|token)[a-z_]*\s*[=:]\s*[\"']?[A-Za-z0-9/+_-]{6,}",
    re.IGNORECASE,
)


def test_dev_test_and_production_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"dev", "test", "production"}


@pytest.mark.parametrize(("path", "env"), CASES, ids=[f"{p.stem}-{e or 'base'}" for p, e in CASES])
def test_config_loads_and_validates(path: Path, env: str | None) -> None:
    cfg = config.load(path, env=env, environ={})
    assert cfg.source.startswith(str(path))
    # a real file, so every section must have been spelled right: strict validation passed
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(data) - {"env"} <= set(cfg.model_dump())


@pytest.mark.parametrize(("path", "env"), CASES, ids=[f"{p.stem}-{e or 'base'}" for p, e in CASES])
def test_archive_urls_build_their_backend(path: Path, env: str | None, tmp_path: Path) -> None:
    cfg = config.load(path, env=env, environ={})
    url = cfg.bindings.archive
    if url.startswith("file://"):
        url = f"file://{tmp_path / 'archive'}"  # the relative dev path, rooted in tmp
    store = ARCHIVE_BACKENDS[url.split(":", 1)[0]](url, None, cfg)  # type: ignore[arg-type]
    assert store is not None


def test_production_uses_postgresql_and_s3_with_endpoint() -> None:
    for env in (None, "staging"):
        cfg = config.load(INFRA / "production.toml", env=env, environ={})
        assert cfg.bindings.db.startswith("postgresql")
        assert cfg.bindings.archive.startswith("s3://")
        assert "endpoint_url=" in cfg.bindings.archive
    staging = config.load(INFRA / "production.toml", env="staging", environ={})
    assert "staging" in staging.bindings.db and staging.consumer.max_batch_size == 200


def test_env_var_still_overrides_an_example(tmp_path: Path) -> None:
    cfg = config.load(INFRA / "production.toml", environ={"EDGEPIPE_BINDINGS__DB": f"sqlite:///{tmp_path}/x.db"})
    assert cfg.bindings.db.startswith("sqlite")


@pytest.mark.parametrize("path", [*CONFIGS, *INFRA.glob("**/*.service"), INFRA / "docker-compose.yml"], ids=str)
def test_no_secrets_in_infra(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not SECRET.search(text), SECRET.search(text)


def test_secret_pattern_is_not_vacuous() -> None:
    assert SECRET.search('db = "postgresql://edgepipe:hunter2@db/edgepipe"')
    assert SECRET.search("aws_secret_access_key = AKIAabcdef1234")
    assert SECRET.search("POSTGRES_PASSWORD: hunter22")
    assert not SECRET.search("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not SECRET.search('db = "postgresql+psycopg://edgepipe@db.internal:5432/edgepipe"')


def test_cli_accepts_each_example(tmp_path: Path) -> None:
    """`--config infra/X.toml --env E` passes the CLI's start-up validation (the placeholder
    database host is swapped for a scratch SQLite file, as an operator would by env var)."""
    runner = CliRunner()
    for path, env in CASES:
        args = ["--config", str(path), *(["--env", env] if env else []), "db", "current"]
        environ = {"EDGEPIPE_BINDINGS__DB": f"sqlite:///{tmp_path / 'probe.db'}", "EDGEPIPE_ENV": None}
        result = runner.invoke(main, args, env=environ)
        assert result.exit_code == 0, (path, env, result.output)


@pytest.mark.parametrize("unit", sorted(INFRA.glob("systemd/*.service")), ids=lambda p: p.name)
def test_systemd_units(unit: Path) -> None:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    command = service["ExecStart"].split()
    assert command[0].endswith("/edgepipe")
    assert "EDGEPIPE_CONFIG=/etc/edgepipe/production.toml" in service["Environment"]
    assert service["KillSignal"] == "SIGTERM"
    result = CliRunner().invoke(main, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output


def test_systemd_has_worker_and_serve() -> None:
    assert {p.name for p in INFRA.glob("systemd/*.service")} >= {"edgepipe-worker.service", "edgepipe-serve.service"}


def test_compose_file_has_the_services() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"postgres", "minio"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    for name in ("postgres", "minio"):
        values = " ".join(str(v) for v in services[name]["environment"].values())
        assert "${" in values  # credentials come from the environment
