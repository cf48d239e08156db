"""Fixtures and helpers of the archive tests: the object-store backends as one fixture
(file directory, moto in process, moto's threaded server over real HTTP), an Env with a
chosen archive, and small drivers (ingest + consume, run a job at a time)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import pytest
import sqlalchemy as sa

from archiver.objects import MANIFEST_NAME
from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.bindings.archive import ObjectInfo, ObjectStore
from pipeline.env import Env
from pipeline.errors import BindingError
from pipeline.jobs import JOBS
from pipeline.schema import traffic_events
from pipeline.worker import Worker

REGION = "us-east-1"
STORES = ["file", "moto", "moto_server"]


def _bucket(endpoint: str | None) -> str:
    name = f"edgepipe-{secrets.token_hex(4)}"
    boto3.client("s3", region_name=REGION, endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=STORES)
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty archive bucket on each object-store backend, as a binding URL."""
    if request.param == "file":
        yield f"file://{tmp_path / 'bucket'}"
        return
    request.getfixturevalue("aws_credentials")
    if request.param == "moto":
        from moto import mock_aws

        with mock_aws():
            yield f"s3://{_bucket(None)}/archive?region={REGION}"
        return
    endpoint = request.getfixturevalue("moto_server")
    bucket = _bucket(endpoint)
    yield f"s3://{bucket}/archive?region={REGION}&endpoint_url={endpoint}&addressing_style=path"


def at(text: str) -> datetime:
    return datetime.fromtimestamp(clock.parse_time(text), UTC)


def ms(text: str) -> int:
    return int(clock.parse_time(text) * 1000)


def event(i: int, ts_ms: int, path: str = "/api/items", status: int = 200, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"ev-{i}",
        "ts": ts_ms,
        "method": "GET",
        "path": path,
        "status": status,
        "response_time_ms": 10.0 + i % 97,
        "host": "api.example.com",
        "bytes": 100 + i,
    } | extra


def consume(env: Env, events: list[dict[str, Any]]) -> dict[str, int]:
    """Enqueue and drain; totals of the batch reports."""
    for i in range(0, len(events), 1000):
        env.QUEUE.send_batch(events[i : i + 1000])
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    out = {"inserted": 0, "too_late": 0}
    while (res := worker.step(wait=0)) is not None:
        assert res.ok, res.error
        out["inserted"] += res.report.inserted
        out["too_late"] += res.report.too_late
    return out


def run_job(env: Env, name: str, when: str, dry_run: bool = False) -> dict[str, Any]:
    return JOBS[name](env, at(when), dry_run)


def hot_ids(env: Env, states: tuple[int, ...] = (0, 1)) -> list[str]:
    with env.DB.read() as conn:
        te = traffic_events
        return list(conn.execute(sa.select(te.c.id).where(te.c.archive_state.in_(states))).scalars())


def bucket_ids(env: Env) -> list[str]:
    """Ids of every event in every object of the bucket (duplicates kept)."""
    from archiver.objects import KEY_RE, read_object

    ids: list[str] = []
    for info in env.ARCHIVE.list(env.config.archive.prefix + "/"):
        if not KEY_RE.search(info.key):  # the days' manifests
            continue
        ids.extend(r["id"] for r in read_object(env.ARCHIVE, info.key))
    return ids


MakeArchiveEnv = Callable[..., Env]


@pytest.fixture
def archive_env(db_url: str, archive_url: str, make_env: Any) -> MakeArchiveEnv:
    """`archive_env(**sections)`: an Env on every DB backend × every archive backend."""

    def make(**sections: Any) -> Env:
        sections["bindings"] = {"archive": archive_url} | sections.get("bindings", {})
        return make_env(db_url, **sections)

    return make


class FailingStore(ObjectStore):
    """The real store, except that `put` fails after reading part of the body."""

    def __init__(self, inner: ObjectStore, fail_puts: int = 1) -> None:
        self.inner = inner
        self.fail_puts = fail_puts

    def put(self, key: str, body: BinaryIO, metadata: dict[str, str] | None = None) -> ObjectInfo:
        if self.fail_puts > 0:
            self.fail_puts -= 1
            body.read(10)
            raise BindingError("s3 connection reset during upload")
        return self.inner.put(key, body, metadata)

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def get(self, key: str, chunk_size: int = 1 << 20) -> Any:
        return self.inner.get(key, chunk_size)

    def list(self, prefix: str = "") -> Any:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class ManifestFailingStore(FailingStore):
    """The real store, except that every manifest `put` fails while `fail_manifests` is set."""

    fail_manifests = True

    def put(self, key: str, body: BinaryIO, metadata: dict[str, str] | None = None) -> ObjectInfo:
        if self.fail_manifests and key.endswith(MANIFEST_NAME):
            raise BindingError("s3 connection reset during upload")
        return self.inner.put(key, body, metadata)
