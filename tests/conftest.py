"""Shared fixtures. Backends are fixtures: a test that takes `env` runs once per reachable
DB backend (SQLite always; PostgreSQL from $EDGEPIPE_TEST_POSTGRES_URL). A service that is
unreachable skips its tests locally and fails them when CI=true."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg  # noqa: F401  (load its C module before freezegun patches datetime)
import pytest

from pipeline import migrate
from pipeline.config import Config
from pipeline.env import Env, open_env
from tests.support import scratch_db

PG_URL = os.environ.get("EDGEPIPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("EDGEPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AWS_REGION = "us-east-1"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, port: int) -> None:
    if not _reachable(url, port):
        message = f"{name} not reachable at {url}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: service-backed tests must run)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    require_service("PostgreSQL", PG_URL, 5432)
    return PG_URL


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    require_service("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials, so boto3 never looks for real ones."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's threaded server (S3 and SQS over real HTTP) on a free loopback port. In this
    process, so a frozen clock (freezegun) freezes its timers too."""
    from moto.server import ThreadedMotoServer
    from moto.sqs.models import SQSBackend

    # moto's ReceiveMessage is not atomic: two at the same moment can both take one message
    # (an SQS server never hands a visible message to two receivers at once). Serialise it.
    receive, lock = SQSBackend.receive_message, threading.Lock()

    def receive_message(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return receive(self, *args, **kwargs)

    SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    SQSBackend.receive_message = receive  # type: ignore[method-assign]


def _unique(prefix: str) -> str:
    import secrets

    return f"{prefix}{secrets.token_hex(4)}"


QUEUE_BACKENDS = [
    "db-sqlite",
    pytest.param("db-postgres", marks=pytest.mark.postgres),
    "sqs",
    "redis",
]


@contextlib.contextmanager
def queue_url(request: pytest.FixtureRequest, backend: str) -> Iterator[str]:
    """A fresh queue URL on `backend` ("db", "sqs" on moto's threaded server, "redis" on the
    real Redis); SQS queues and Redis keys are removed afterwards."""
    if backend == "db":
        yield "db"
    elif backend == "sqs":
        import boto3

        request.getfixturevalue("aws_credentials")
        endpoint = request.getfixturevalue("moto_server")
        queue = _unique("edgepipe-test-")
        yield f"sqs://{queue}?region={AWS_REGION}&endpoint_url={endpoint}"
        sqs = boto3.client("sqs", region_name=AWS_REGION, endpoint_url=endpoint)
        for q in (queue, f"{queue}-dlq"):
            with contextlib.suppress(sqs.exceptions.QueueDoesNotExist):
                sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=q)["QueueUrl"])
    else:
        import redis

        server = request.getfixturevalue("redis_server_url")
        stream = _unique("edgepipe-test-")
        yield f"{server}?stream={stream}"
        client = redis.Redis.from_url(server)
        keys = list(client.scan_iter(match=f"{stream}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(db URL, queue URL) on every queue backend: the `db` queue on SQLite and PostgreSQL,
    an SQS queue on moto's threaded server, a Redis stream on the real Redis (both beside a
    SQLite database). Each test gets its own queue."""
    if request.param == "db-postgres":
        with scratch_db(request.getfixturevalue("pg_server_url"), tmp_path) as url:
            yield url, "db"
        return
    with queue_url(request, "db" if request.param == "db-sqlite" else request.param) as url:
        yield f"sqlite:///{tmp_path / 'edgepipe.db'}", url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL: a SQLite file in tmp_path, or a throwaway PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'edgepipe.db'}"
        return
    server = request.getfixturevalue("pg_server_url")
    with scratch_db(server, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'edgepipe.db'}"


MakeEnv = Callable[..., Env]


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[MakeEnv]:
    """Build a migrated Env: `make_env(db_url, consumer={...}, ...)`; closed at teardown."""
    made: list[Env] = []

    def make(url: str, **sections: dict[str, Any]) -> Env:
        base = {"db": url, "archive": f"file://{tmp_path / 'archive'}"}
        sections["bindings"] = base | sections.get("bindings", {})
        sections.setdefault("consumer", {}).setdefault("max_batch_timeout", 0)
        sections["consumer"].setdefault("retry_delay", 0)  # tests redeliver at once unless they say otherwise
        sections["cleaner"] = {"stats_file": str(tmp_path / "stats" / "lifetime_stats.json")} | sections.get(
            "cleaner", {}
        )
        cfg = Config().replace(**sections)
        env = open_env(cfg, check_schema=False)
        migrate.upgrade(env.DB)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def run_cli(env: Env, *args: str, environ: dict[str, str] | None = None) -> Any:
    """`edgepipe ARGS`, in process, on `env`'s database, archive and stats file (passed as
    environment variables, as an operator would), plus `environ`."""
    from click.testing import CliRunner

    from pipeline.cli import main

    cfg = env.config
    base = {
        "EDGEPIPE_BINDINGS__DB": cfg.bindings.db,
        "EDGEPIPE_BINDINGS__ARCHIVE": cfg.bindings.archive,
        "EDGEPIPE_CLEANER__STATS_FILE": cfg.cleaner.stats_file,
    }
    return CliRunner().invoke(main, list(args), env=base | (environ or {}), catch_exceptions=False)


@pytest.fixture
def env(db_url: str, make_env: MakeEnv) -> Env:
    """A migrated Env on every reachable DB backend."""
    return make_env(db_url)


@pytest.fixture
def make_qenv(queue_backend: tuple[str, str], make_env: MakeEnv) -> MakeEnv:
    """`make_qenv(consumer={...}, ...)`: a migrated Env on one queue backend (see
    `queue_backend`), its queue created (`Queue.ensure`); every call shares the database
    and the queue, as separate processes would."""
    db, queue = queue_backend

    def make(**sections: dict[str, Any]) -> Env:
        sections["bindings"] = {"queue": queue} | sections.get("bindings", {})
        made = make_env(db, **sections)
        made.QUEUE.ensure()
        return made

    return make


@pytest.fixture
def qenv(make_qenv: MakeEnv) -> Env:
    """A migrated Env on every queue backend."""
    return make_qenv()


@pytest.fixture(autouse=True, scope="session")
def _jobs_registered() -> None:
    """The tests compose like the CLI does: the worker packages' jobs are registered."""
    from pipeline.cli.compose import register_jobs

    register_jobs()
