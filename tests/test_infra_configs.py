"""The example configs in infra/ load and validate in every environment they define, every
binding URL in them has a backend, they hold no secrets, and the deployment files (systemd
units, compose files, the Dockerfile) are well-formed and point at commands that exist."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from pipeline import config
from pipeline.bindings.db.engine import open_engine
from pipeline.cli import main
from pipeline.env import ARCHIVE_BACKENDS, KV_BACKENDS, QUEUE_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CONFIGS = sorted(INFRA.glob("*.toml"))
UNITS = sorted(INFRA.glob("systemd/*.service"))
COMPOSE_FILES = sorted(INFRA.glob("docker-compose*.yml"))
DOCKERFILE = INFRA / "Dockerfile"
CASES = [
    (path, env)
    for path in CONFIGS
    for env in (None, *sorted(tomllib.loads(path.read_text(encoding="utf-8")).get("env", {})))
]
# credentials in a URL, or a password / secret / key / token assigned a literal value
SECRET = re.compile(
    r"://[^/@\s:]*:(?!\$\{)[^/@\s]+@|(password|secret|access_key|token)[a-z_]*\s*[=:]\s*[\"']?[A-Za-z0-9/+_-]{6,}",
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


@pytest.mark.parametrize(("path", "env"), CASES, ids=[f"{p.stem}-{e or 'base'}" for p, e in CASES])
def test_every_binding_url_has_a_backend(path: Path, env: str | None, tmp_path: Path) -> None:
    """Each URL's scheme is registered (the queue, KV and archive registries of
    `pipeline.env`; the DB's engine), and the backends that connect lazily are built."""
    cfg = config.load(path, env=env, environ={})
    b = cfg.bindings
    assert _scheme(b.queue) in QUEUE_BACKENDS, b.queue
    assert _scheme(b.kv) in KV_BACKENDS, b.kv
    assert _scheme(b.archive) in ARCHIVE_BACKENDS, b.archive
    db_url = f"sqlite:///{tmp_path / 'probe.db'}" if b.db.startswith("sqlite") else b.db
    open_engine(db_url).dispose()  # SQLAlchemy finds the dialect and its driver; nothing connects
    if _scheme(b.kv) == "redis":
        kv = KV_BACKENDS["redis"](b.kv, None, cfg)  # type: ignore[arg-type]
        kv.close()


def test_config_schemes_are_exactly_the_registered_backends() -> None:
    """A URL the config loader accepts always finds a backend at start-up."""
    assert set(config.QUEUE_SCHEMES) == set(QUEUE_BACKENDS)
    assert set(config.KV_SCHEMES) == set(KV_BACKENDS)
    assert set(config.ARCHIVE_SCHEMES) == set(ARCHIVE_BACKENDS)
    for scheme in config.DB_SCHEMES:
        assert sa.make_url(f"{scheme}://").get_backend_name() in ("sqlite", "postgresql")


def test_production_scales_out_on_redis_and_sqs() -> None:
    base = config.load(INFRA / "production.toml", environ={})
    assert base.bindings.db.startswith("postgresql+psycopg://")
    assert base.bindings.queue.startswith("redis://") and _query(base.bindings.queue)["stream"] == "events"
    assert base.bindings.kv.startswith("redis://") and _query(base.bindings.kv)["prefix"] == "edgepipe:kv:"
    assert base.bindings.archive.startswith("s3://")
    staging = config.load(INFRA / "production.toml", env="staging", environ={})
    for url in (staging.bindings.queue, staging.bindings.kv):
        assert urlsplit(url).hostname == "redis.staging.example"  # never the production Redis
    sqs = config.load(INFRA / "production.toml", env="sqs", environ={})
    assert urlsplit(sqs.bindings.queue).scheme == "sqs" and urlsplit(sqs.bindings.queue).netloc == "edgepipe-events"
    assert _query(sqs.bindings.queue)["region"]
    for cfg in (base, staging, sqs):  # the operating keys hold in every environment
        assert (cfg.retention.detail_days, cfg.retention.archive_days, cfg.retention.hourly_days) == (3, 0, 400)
        assert cfg.cleaner.max_run_seconds == 900 and cfg.archive.verify == "full"


@pytest.mark.parametrize("path", [*CONFIGS, *UNITS, *COMPOSE_FILES, *INFRA.glob("Dockerfile*")], ids=lambda p: p.name)
def test_no_secrets_in_infra(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not SECRET.search(text), SECRET.search(text)


def test_secret_pattern_is_not_vacuous() -> None:
    assert SECRET.search('db = "postgresql://edgepipe:hunter2@db/edgepipe"')
    assert SECRET.search("aws_secret_access_key = AKIAabcdef1234")
    assert SECRET.search("POSTGRES_PASSWORD: hunter22")
    assert not SECRET.search("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not SECRET.search('db = "postgresql+psycopg://edgepipe@db.internal:5432/edgepipe"')
    assert SECRET.search('queue = "redis://:hunter2@redis:6379/0?stream=events"')  # a password alone
    assert not SECRET.search("QUEUE: redis://:${REDIS_PASSWORD}@redis:6379/0?stream=events")


def test_cli_accepts_each_example(tmp_path: Path) -> None:
    """`--config infra/X.toml --env E` passes the CLI's start-up validation (the placeholder
    database host is swapped for a scratch SQLite file, as an operator would by env var)."""
    runner = CliRunner()
    for path, env in CASES:
        args = ["--config", str(path), *(["--env", env] if env else []), "db", "current"]
        environ = {"EDGEPIPE_BINDINGS__DB": f"sqlite:///{tmp_path / 'probe.db'}", "EDGEPIPE_ENV": None}
        result = runner.invoke(main, args, env=environ)
        assert result.exit_code == 0, (path, env, result.output)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
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
    assert {p.name for p in UNITS} >= {
        "edgepipe-worker.service",
        "edgepipe-worker@.service",
        "edgepipe-init.service",
        "edgepipe-serve.service",
    }


def test_systemd_worker_template_runs_init_once_first() -> None:
    """`systemctl enable --now edgepipe-worker@{1..4}`: each instance is named by its
    number, and requires (and starts after) the one-shot init unit, which runs `init`."""
    worker, init = (
        _unit(INFRA / "systemd" / "edgepipe-worker@.service"),
        _unit(INFRA / "systemd" / "edgepipe-init.service"),
    )
    assert "%i" in worker["Unit"]["Description"]
    assert "edgepipe-init.service" in worker["Unit"]["Requires"].split()
    assert "edgepipe-init.service" in worker["Unit"]["After"].split()
    assert "ExecStartPre" not in worker["Service"]  # not once per instance: concurrently
    assert worker["Service"]["ExecStart"].split()[1:] == ["worker"]
    assert init["Service"]["Type"] == "oneshot" and init["Service"]["ExecStart"].split()[1:] == ["init"]
    single = _unit(INFRA / "systemd" / "edgepipe-worker.service")
    for key in ("User", "Group", "WorkingDirectory", "EnvironmentFile", "KillSignal", "TimeoutStopSec",
                "Restart", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths"):  # fmt: skip
        assert worker["Service"][key] == single["Service"][key], key
    # and a metrics port of its own per instance (9101 for worker 1, …)
    assert worker["Service"]["Environment"].split() == [
        *single["Service"]["Environment"].split(),
        "EDGEPIPE_WORKER__METRICS_PORT=910%i",
    ]


def test_compose_file_has_the_services() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"postgres", "minio"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    for name in ("postgres", "minio"):
        values = " ".join(str(v) for v in services[name]["environment"].values())
        assert "${" in values  # credentials come from the environment


def test_scale_compose_runs_the_whole_system() -> None:
    compose = _compose(INFRA / "docker-compose.scale.yml")
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "init", "serve", "worker"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    edgepipe = {name for name, svc in services.items() if _is_edgepipe(svc)}
    assert edgepipe == {"init", "serve", "worker"}
    assert services["init"]["command"] == ["init"] and services["init"]["restart"] == "no"
    assert services["init"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "minio-bucket": {"condition": "service_completed_successfully"},
    }
    for name in ("serve", "worker"):
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}
        assert services[name]["restart"] == "unless-stopped"
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` works
    assert any("/health" in part for part in services["serve"]["healthcheck"]["test"])


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_are_checked_and_ordered(path: Path) -> None:
    """Every long-running service has a health check; a one-shot exits and is waited for
    by its exit code; every dependency and named volume exists."""
    compose = _compose(path)
    services = compose["services"]
    for name, svc in services.items():
        if svc.get("restart") == "no":
            assert "healthcheck" not in svc, name
        else:
            test = svc.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), name
        for dep, rule in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            one_shot = services[dep].get("restart") == "no"
            want = "service_completed_successfully" if one_shot else "service_healthy"
            assert rule["condition"] == want, (name, dep)
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in (compose.get("volumes") or {}), (name, source)


def test_compose_edgepipe_services_load_the_config_they_are_given(tmp_path: Path) -> None:
    """The services built from infra/Dockerfile run the config the image installs, with the
    bindings the compose file sets: it loads, and every binding points at a compose service."""
    compose = _compose(INFRA / "docker-compose.scale.yml")
    services = compose["services"]
    installed = _dockerfile_config()
    for name, svc in services.items():
        if not _is_edgepipe(svc):
            continue
        environ = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        assert environ["EDGEPIPE_CONFIG"] == installed[1]
        cfg = config.load(installed[0], environ=environ)
        b = cfg.bindings
        hosts = [urlsplit(b.db).hostname, urlsplit(b.queue).hostname, urlsplit(b.kv).hostname]
        hosts.append(urlsplit(_query(b.archive)["endpoint_url"]).hostname)
        assert set(hosts) <= set(services), (name, hosts)
        assert _scheme(b.queue) in QUEUE_BACKENDS and _scheme(b.kv) in KV_BACKENDS
        assert _scheme(b.archive) in ARCHIVE_BACKENDS
        assert {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(environ)


def test_dockerfile_installs_every_package() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    copied = {m.group(1) for m in re.finditer(r"^COPY\s+(\S+)\s", text, re.MULTILINE)}
    for source in copied:
        assert (ROOT / source).exists(), source
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert {p.rstrip("*") for p in packages["find"]["include"]} <= copied
    assert re.search(r'^ENTRYPOINT \["edgepipe"\]$', text, re.MULTILINE)
    source, target = _dockerfile_config()
    assert source.is_file() and f"EDGEPIPE_CONFIG={target}" in text


# -- every `edgepipe ...` the deployment files run names a real command -------------------

SHELL_OPERATORS = {"|", "||", "&&", ";"}
PLACEHOLDERS = {"…", "...", "ARGS"}


def _edgepipe_invocations(path: Path) -> list[list[str]]:
    """The argument lists given to `edgepipe` in a deployment file: systemd Exec* lines,
    compose commands and health checks of the edgepipe image, and the shell examples in
    the file's comments (indented example lines, and `…` spans) — run directly, or in a
    compose service through `docker compose run` / `exec`."""
    text = path.read_text(encoding="utf-8")
    calls: list[list[str]] = []
    lines: list[str] = []
    if path.suffix == ".service":
        for section in _unit(path).values():
            lines += [v for k, v in section.items() if k.startswith("Exec")]
    if path.suffix == ".yml":
        for svc in _compose(path)["services"].values():
            if _is_edgepipe(svc) and "command" in svc:
                calls.append([str(word) for word in svc["command"]])
            lines += [str(part) for part in svc.get("healthcheck", {}).get("test", [])[1:]]
    for line in text.splitlines():
        comment = re.match(r"\s*#(.*)", line)
        if comment is None:
            continue
        if re.match(r"\s{2,}\S", comment.group(1)):
            lines.append(comment.group(1))
        lines += re.findall(r"`([^`]+)`", comment.group(1))
    for line in lines:
        calls += _shell_invocations(line)
    return calls


def _shell_invocations(line: str) -> list[list[str]]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # a continued line, or a quote closed on another one
        tokens = line.split()
    calls, command = [], []
    for token in [*tokens, ";"]:
        if token not in SHELL_OPERATORS:
            command.append(token)
            continue
        while command and (re.match(r"^\w+=", command[0]) or command[0] in ("sudo", "exec")):
            dropped = command.pop(0)
            if dropped == "sudo":
                while command and command[0].startswith("-"):
                    flag = command.pop(0)
                    if flag in ("-u", "-g") and command:
                        command.pop(0)
        if command and (command[0] == "edgepipe" or command[0].endswith("/edgepipe")):
            calls.append(command[1:])
        elif command[:2] == ["docker", "compose"]:
            calls += _compose_invocation(command[2:])
        command = []
    return calls


def _compose_invocation(args: list[str]) -> list[list[str]]:
    """`docker compose [-f FILE] run|exec [FLAGS] SERVICE ARGS…` on an edgepipe service:
    `run` passes ARGS to the image's `edgepipe` entrypoint, `exec` runs ARGS as they are."""
    file = INFRA / "docker-compose.yml"
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("-f", "--file", "-p", "--project-name") and args:
            value = args.pop(0)
            if flag in ("-f", "--file"):
                file = ROOT / value
    if not args or args[0] not in ("run", "exec"):
        return []
    verb, args = args[0], args[1:]
    while args and args[0].startswith("-"):
        args.pop(0)
    if not args:
        return []
    service, rest = args[0], args[1:]
    if not _is_edgepipe(_compose(file)["services"].get(service, {})):
        return []
    if verb == "run":
        return [rest] if rest else []  # none: the service's own command, checked above
    return [rest[1:]] if rest and rest[0] == "edgepipe" else []


def _check_invocation(words: list[str]) -> str | None:
    """None when `edgepipe WORDS` names an existing command with options it has, else why not."""
    command: click.Command = main
    ctx = click.Context(main)
    rest = list(words)
    while rest:
        word = rest.pop(0)
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            param = next((p for p in command.params if name in (*p.opts, *p.secondary_opts)), None)
            if param is None and name not in ("-h", "--help"):
                return f"{command.name}: no option {name}"
            if param is not None and not getattr(param, "is_flag", False) and "=" not in word and rest:
                rest.pop(0)  # the option's value
            continue
        if word in PLACEHOLDERS:
            return None
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, word)
            if sub is None:
                return f"{command.name}: no command {word!r}"
            command = sub
        # a leaf command's other words are its arguments
    if isinstance(command, click.Group):
        return f"{command.name}: no command given"
    return None


DEPLOYMENT_FILES = [*UNITS, *COMPOSE_FILES, *CONFIGS]


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_every_edgepipe_command_exists(path: Path) -> None:
    if path.suffix == ".yml":
        pytest.importorskip("yaml")
    calls = _edgepipe_invocations(path)
    if path.suffix == ".service" or path.name == "docker-compose.scale.yml":
        assert calls, "no edgepipe command found"
    problems = [(call, why) for call in calls if (why := _check_invocation(call))]
    assert not problems, problems


def test_scale_compose_and_units_run_the_expected_commands() -> None:
    pytest.importorskip("yaml")
    scale = _edgepipe_invocations(INFRA / "docker-compose.scale.yml")
    for expected in (["init"], ["serve"], ["worker"], ["status", "--json"], ["tokens", "create"]):
        assert any(call[: len(expected)] == expected for call in scale), expected
    template = _edgepipe_invocations(INFRA / "systemd" / "edgepipe-worker@.service")
    assert ["worker"] in template


def test_command_check_is_not_vacuous() -> None:
    assert _check_invocation(["--config", "infra/dev.toml", "--env", "compose", "init"]) is None
    assert _check_invocation(["snapshot", "show", "--json"]) is None
    assert _check_invocation(["status", "--json"]) is None
    assert _check_invocation(["ingest", "-"]) is None
    assert _check_invocation(["wroker"])
    assert _check_invocation(["status", "--jsno"])
    assert _check_invocation(["snapshot", "shwo"])
    assert _check_invocation(["snapshot"])
    assert _check_invocation([])
    assert _shell_invocations("A=1 sudo -u edgepipe /opt/x/edgepipe tokens create && edgepipe wroker | grep x") == [
        ["tokens", "create"],
        ["wroker"],
    ]
    assert _shell_invocations("pg_isready -U edgepipe -d edgepipe") == []


# -- helpers ------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.split(":", 1)[0]


def _query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _compose(path: Path) -> dict[str, Any]:
    """A compose file with the services and volumes of the files it `include`s merged in."""
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    for included in compose.get("include", []):
        other = _compose(path.parent / (included if isinstance(included, str) else included["path"]))
        for key in ("services", "volumes"):
            clash = set(compose.get(key) or {}) & set(other.get(key) or {})
            assert not clash, f"{path.name} redefines {key} of {included}: {clash}"
            compose[key] = (other.get(key) or {}) | (compose.get(key) or {})
    return compose


def _is_edgepipe(service: dict[str, Any]) -> bool:
    """Built from infra/Dockerfile, whose entrypoint is `edgepipe`."""
    return str(service.get("build", {}).get("dockerfile", "")) == "infra/Dockerfile"


def _interpolate(value: str) -> str:
    """Compose's `${NAME}`, `${NAME:?message}` and `${NAME:-default}`, with placeholder values."""
    return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda m: f"{m.group(1).lower()}-value", value)


def _dockerfile_config() -> tuple[Path, str]:
    """(the config file in infra/ the image installs, where it installs it)."""
    match = re.search(r"^COPY\s+infra/(\S+\.toml)\s+(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "the Dockerfile installs no config"
    return INFRA / match.group(1), match.group(2)
