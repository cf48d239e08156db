"""Dead-letter retention: letters older than `[consumer] dlq_retention_days` are purged
(by the `clean` job). Purged letters stay counted in `Queue.rejected_totals`."""

from __future__ import annotations

from pipeline.env import Env

DAY_S = 86_400


def retention_cutoff_s(env: Env, now_s: float) -> float | None:
    """Epoch seconds before which dead letters have expired at `now_s`; None when they are
    kept forever (`dlq_retention_days` = 0)."""
    days = env.config.consumer.dlq_retention_days
    return None if days <= 0 else now_s - days * DAY_S


def purge_expired_letters(env: Env, now_s: float) -> int:
    """Purge the dead letters of `env.QUEUE` that failed before the retention cutoff at
    `now_s` (all reasons); returns how many (0 when retention is off)."""
    cutoff = retention_cutoff_s(env, now_s)
    return 0 if cutoff is None else env.QUEUE.dlq_purge(before=cutoff)
