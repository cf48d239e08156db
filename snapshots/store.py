"""Versioned hot-path snapshots in the KV binding.

Each refresh writes the whole snapshot under a new versioned key (`snapshot:v000123`,
zero-padded so KV's byte-ordered `list` is version order), then the same document under
`snapshot:latest`, last. `latest` holds a full copy, not a pointer, so a reader does one
`get` and can never catch a version that pruning deleted in between, nor a half-written
one (a KV `put` replaces a value atomically).

Versions come from the durable `snapshot_version` counter in the DB binding, so two
refreshing processes never reuse a number; `latest` is only moved forward. The counter's
row (SQLite's write lock, a row lock on PostgreSQL) is held until the publishing
transaction commits, so workers publish one at a time, whatever the KV backend (a KV
outside the database, such as Redis, is written while the lock is held).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import clock, log, meta
from pipeline.env import Env
from pipeline.queries import top_paths
from pipeline.snapshot_doc import LATEST_KEY

KEY_PREFIX = "snapshot:v"
VERSION_DIGITS = 6
VERSION_COUNTER = "snapshot_version"
ROW_FIELDS = (
    "path", "method", "requests", "status_4xx", "status_5xx", "errors", "error_rate",
    "rt_avg_ms", "p50_ms", "p95_ms", "p99_ms", "rt_min_ms", "rt_max_ms", "bytes_sum",
)  # fmt: skip


def version_key(version: int) -> str:
    return f"{KEY_PREFIX}{version:0{VERSION_DIGITS}d}"


def build(db: Any, window_hours: int, top_n: int, now_s: float | None = None) -> dict[str, Any]:
    """The snapshot document (without a version) from the hourly aggregates."""
    now_s = clock.now_s() if now_s is None else now_s
    first_hour = int(now_s) // 3600 * 3600 - (window_hours - 1) * 3600
    rows = top_paths(db, window_hours, top_n, now_s)
    return {
        "generated_at": clock.iso(now_s),
        "window_hours": window_hours,
        "window_start": clock.iso(first_hour),
        "top_n": top_n,
        "paths": [{k: r[k] for k in ROW_FIELDS} for r in rows],
    }


def next_version(db: Any) -> int:
    """Allocate the next snapshot version from the durable counter (atomic)."""
    with db.transaction() as conn:
        return meta.increment(db, conn, VERSION_COUNTER)


def refresh(env: Env, now_s: float | None = None) -> dict[str, Any]:
    """Build and publish a new snapshot version; returns a summary of what was written."""
    cfg = env.config.snapshots
    started = clock.monotonic()
    doc = build(env.DB, cfg.window_hours, cfg.top_n, now_s)
    return publish(env, doc, started)


def publish(env: Env, doc: dict[str, Any], started: float | None = None) -> dict[str, Any]:
    """Write a built document as the next version, then as `latest` if it is newer.

    One write transaction for the version and both puts (a KV binding in the DB binding's
    database joins it): the consumer waits for the write lock once per refresh, not three
    times, and `latest` is compared and moved atomically."""
    started = clock.monotonic() if started is None else started
    with env.DB.transaction():
        version = next_version(env.DB)
        doc = {"version": version, **doc}
        info = {"version": version, "generated_at": doc["generated_at"], "paths": len(doc["paths"])}
        env.require_kv().put(version_key(version), doc, metadata=info)
        current = env.require_kv().get_with_metadata(LATEST_KEY, type="bytes")["metadata"] or {}
        moved = int(current.get("version", 0)) < version
        if moved:
            env.require_kv().put(LATEST_KEY, doc, metadata=info)
    ms = round((clock.monotonic() - started) * 1000, 1)
    log.event("snapshot_refresh", version=version, paths=len(doc["paths"]), latest=moved, ms=ms)
    return {"version": version, "key": version_key(version), "paths": len(doc["paths"]), "latest": moved, "ms": ms}


def list_versions(kv: Any) -> list[dict[str, Any]]:
    """Every stored version, oldest first: key, version, generated_at, paths."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = kv.list(prefix=KEY_PREFIX, cursor=cursor)
        for item in page["keys"]:
            meta = item.get("metadata") or {}
            out.append({"key": item["name"], "version": int(item["name"][len(KEY_PREFIX) :]), **meta})
        if page["list_complete"]:
            return out
        cursor = page["cursor"]


def prune(kv: Any, keep: int, dry_run: bool = False) -> dict[str, Any]:
    """Delete all but the newest `keep` versions (`latest` is never touched)."""
    if keep < 1:
        from pipeline.errors import ValidationError

        raise ValidationError("keep", f"must be ≥ 1, got {keep}")
    versions = list_versions(kv)
    doomed = versions[:-keep] if len(versions) > keep else []
    if not dry_run:
        for v in doomed:
            kv.delete(v["key"])
    kept = versions[len(doomed) :]
    log.event("snapshot_prune", logging.INFO, deleted=len(doomed), kept=len(kept), dry_run=dry_run)
    return {
        "deleted": len(doomed),
        "kept": len(kept),
        "kept_versions": [v["version"] for v in kept],
        "deleted_versions": [v["version"] for v in doomed],
        "dry_run": dry_run,
    }
