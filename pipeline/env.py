"""The composition root: build the bindings (`Env`) from configuration, by URL scheme.

Workers receive an `Env` and see only its bindings: `DB`, `QUEUE`, `KV`, `ARCHIVE`, plus
the validated `config`. Backends are imported lazily, so an embedded deployment never
imports boto3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.bindings.db import Database
from pipeline.bindings.queue import Queue, QueueSettings
from pipeline.config import Config
from pipeline.errors import ConfigError


def _sql_queue(url: str, db: Database, cfg: Config) -> Queue:
    from pipeline.bindings.queue_sql import SqlQueue

    return SqlQueue(db, "events", queue_settings(cfg))


def _sql_kv(url: str, db: Database, cfg: Config) -> Any:
    from pipeline.bindings.kv_sql import SqlKV

    return SqlKV(db)


def queue_settings(cfg: Config) -> QueueSettings:
    c = cfg.consumer
    return QueueSettings(c.max_retries, c.retry_delay, c.visibility_timeout)


# Registries keyed by URL scheme. Each factory takes (url, db, config).
QUEUE_BACKENDS: dict[str, Callable[[str, Database, Config], Queue]] = {"db": _sql_queue}
KV_BACKENDS: dict[str, Callable[[str, Database, Config], Any]] = {"db": _sql_kv}
ARCHIVE_BACKENDS: dict[str, Callable[[str, Database, Config], Any]] = {}


def _file_archive(url: str, db: Database, cfg: Config) -> Any:
    from pipeline.bindings.archive_file import FileStore

    return FileStore.from_url(url)


def _s3_archive(url: str, db: Database, cfg: Config) -> Any:
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


def _build(kind: str, registry: dict[str, Callable[..., Any]], url: str, db: Database, cfg: Config) -> Any:
    factory = registry.get(_scheme(url))
    if factory is None:
        if kind in ("kv", "archive") and not registry:
            return None  # binding not built into this version yet
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"config error: bindings.{kind}: no backend for {url!r} (known: {known})")
    return factory(url, db, cfg)


@dataclass
class Env:
    config: Config
    DB: Database
    QUEUE: Queue
    KV: Any = None
    ARCHIVE: Any = None

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
        KV=_build("kv", KV_BACKENDS, b.kv, db, cfg),
        ARCHIVE=_build("archive", ARCHIVE_BACKENDS, b.archive, db, cfg),
    )
