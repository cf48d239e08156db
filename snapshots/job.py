"""The weekly `snapshot_prune` job: keep the newest `[snapshots] keep` versions, and drop
KV entries whose expiry has passed (already invisible, still taking space)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.env import Env
from pipeline.jobs import job
from snapshots.store import prune


@job("snapshot_prune")
def run(env: Env, scheduled_for: datetime, dry_run: bool) -> dict[str, Any]:
    result = prune(env.KV, env.config.snapshots.keep, dry_run=dry_run)
    result["expired_purged"] = 0 if dry_run else env.require_kv().purge_expired()
    return result
