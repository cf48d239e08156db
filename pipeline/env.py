"""The composition root: build the bindings (`Env`) from configuration, by URL scheme.

Workers receive an `Env` and see only its bindings: `DB`, `QUEUE`, `KV`, `ARCHIVE`, plus
the validated `config`. Backends are imported lazily, so an embedded deployment never
imports boto3 or redis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.bindings.archive import ObjectStore
from pipeline.bindings.db import Database
from pipeline.bindings.kv import KV
from pipeline.bindings.kv import KV as KVStore  # the name the methods see (the field KV shadows it)
from pipeline.bindings.queue import Queue, QueueSettings
from pipeline.config import Config
from pipeline.errors import ConfigError


def _sql_queue(url: str, db: Database, cfg: Config) -> Queue:
    from pipeline.bindings.queue_sql import SqlQueue

    return SqlQueue(db, "events", queue_settings(cfg))


def _sql_kv(url: str, db: Database, cfg: Config) -> KV:
    from pipeline.bindings.kv_sql import SqlKV

    return SqlKV(db)


def _sqs_queue(url: str, db: Database, cfg: Config) -> Queue:
    from pipeline.bindings.queue_sqs import SqsQueue

    return SqsQueue.from_url(url, db, queue_settings(cfg))


def _redis_queue(url: str, db: Database, cfg: Config) -> Queue:
    from pipeline.bindings.queue_redis import RedisQueue

    return RedisQueue.from_url(url, queue_settings(cfg))


def _redis_kv(url: str, db: Database, cfg: Config) -> KV:
    from pipeline.bindings.kv_redis import RedisKV

    return RedisKV.from_url(url)


def queue_settings(cfg: Config) -> QueueSettings:
    c = cfg.consumer
    return QueueSettings(c.max_retries, c.retry_delay, c.visibility_timeout)


# Registries keyed by URL scheme. Each factory takes (url, db, config).
BindingT = TypeVar("BindingT")
Factory = Callable[[str, Database, Config], BindingT]  # (url, db, config) -> a binding

QUEUE_BACKENDS: dict[str, Factory[Queue]] = {"db": _sql_queue, "sqs": _sqs_queue, "redis": _redis_queue}
KV_BACKENDS: dict[str, Factory[KV]] = {"db": _sql_kv, "redis": _redis_kv}
ARCHIVE_BACKENDS: dict[str, Factory[ObjectStore]] = {}


def _file_archive(url: str, db: Database, cfg: Config) -> ObjectStore:
    from pipeline.bindings.archive_file import FileStore

    return FileStore.from_url(url)


def _s3_archive(url: str, db: Database, cfg: Config) -> ObjectStore:
    from pipeline.bindings.archive_s3 import S3Store

    a = cfg.archive
    return S3Store.from_url(
        url,
        multipart_threshold=a.multipart_threshold,
        connect_timeout=a.connect_timeout,
        read_timeout=a.read_timeout,
        max_attempts=a.max_attempts,
    )


ARCHIVE_BACKENDS.update({"file": _file_archive, "s3": _s3_archive})


def _scheme(url: str) -> str:
    return url.split(":", 1)[0]


def _build(kind: str, registry: dict[str, Factory[BindingT]], url: str, db: Database, cfg: Config) -> BindingT:
    factory = registry.get(_scheme(url))
    if factory is None:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"config error: bindings.{kind}: no backend for {url!r} (known: {known})")
    return factory(url, db, cfg)


def _build_optional(
    kind: str, registry: dict[str, Factory[BindingT]], url: str, db: Database, cfg: Config
) -> BindingT | None:
    """`_build` for an optional binding (KV, archive): None when no backend is registered."""
    if not registry:
        return None  # binding not built into this version yet
    return _build(kind, registry, url, db, cfg)


@dataclass
class Env:
    config: Config
    DB: Database
    QUEUE: Queue
    KV: KV | None = None
    ARCHIVE: ObjectStore | None = None

    def require_archive(self) -> ObjectStore:
        """The ARCHIVE binding; ConfigError when this deployment has none."""
        if self.ARCHIVE is None:
            raise ConfigError("config error: bindings.archive: no archive binding configured")
        return self.ARCHIVE

    def require_kv(self) -> KVStore:
        """The KV binding; ConfigError when this deployment has none."""
        if self.KV is None:
            raise ConfigError("config error: bindings.kv: no KV binding configured")
        return self.KV

    def close(self) -> None:
        for binding in (self.QUEUE, self.KV, self.ARCHIVE):
            close = getattr(binding, "close", None)
            if close is not None:
                close()
        self.DB.dispose()


def open_env(cfg: Config, check_schema: bool = True) -> Env:
    """Build every binding. With `check_schema`, fail clearly on an uninitialised DB."""
    db = Database(cfg.bindings.db)
    if check_schema:
        from pipeline.migrate import require_current

        try:
            require_current(db)
        except Exception:
            db.dispose()
            raise
    b = cfg.bindings
    return Env(
        config=cfg,
        DB=db,
        QUEUE=_build("queue", QUEUE_BACKENDS, b.queue, db, cfg),
        KV=_build_optional("kv", KV_BACKENDS, b.kv, db, cfg),
        ARCHIVE=_build_optional("archive", ARCHIVE_BACKENDS, b.archive, db, cfg),
    )
