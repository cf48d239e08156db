"""Data quality per hour, read from `quality_hourly` (written by the traffic consumer in the
transaction of each batch; see consumers/traffic.py).

For each hour the consumer handled events: `received` (events in the messages, valid or
not), `inserted` (new rows), `duplicates` (already stored, or repeated within a batch),
`invalid` (dead-lettered as invalid, `invalid_by_reason` by the field their error names),
`too_late` (older than the archive watermark), `overflow` (inserted but counted under
`__other__`: the hour's path budget was spent), and the rates of the first three kinds
over `received`. A redelivered batch is received again: its repeats count as duplicates.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.queries import first_hour
from pipeline.schema import quality_hourly

COUNTS = ("received", "inserted", "duplicates", "invalid", "too_late", "overflow")
_KINDS = {"received": "received", "inserted": "inserted", "duplicate": "duplicates", "too_late": "too_late",
          "overflow": "overflow"}  # fmt: skip
INVALID_PREFIX = "invalid:"


def _blank() -> dict[str, Any]:
    return {**dict.fromkeys(COUNTS, 0), "invalid_by_reason": {}}


def _add(into: dict[str, Any], kind: str, n: int) -> None:
    if kind.startswith(INVALID_PREFIX):
        reason = kind[len(INVALID_PREFIX) :]
        into["invalid"] += n
        into["invalid_by_reason"][reason] = into["invalid_by_reason"].get(reason, 0) + n
    elif kind in _KINDS:
        into[_KINDS[kind]] += n


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    received = row["received"]
    for name in ("duplicates", "invalid", "too_late"):
        key = "duplicate_rate" if name == "duplicates" else f"{name}_rate"
        row[key] = round(row[name] / received, 6) if received else 0.0
    row["invalid_by_reason"] = dict(sorted(row["invalid_by_reason"].items()))
    return row


def report(db: Database, hours: int = 24, now_s: float | None = None) -> dict[str, Any]:
    """The last `hours` UTC hours (the current one included): one row per hour, oldest
    first, hours without events included with zeros, and the totals of the window."""
    now_s = clock.now_s() if now_s is None else now_s
    start = first_hour(hours, now_s)
    end = start + hours * 3600
    stmt = (
        sa.select(quality_hourly.c.hour, quality_hourly.c.kind, quality_hourly.c.count)
        .where(quality_hourly.c.hour >= start, quality_hourly.c.hour < end)
        .order_by(quality_hourly.c.hour)
    )
    by_hour: dict[int, dict[str, Any]] = {h: _blank() for h in range(start, end, 3600)}
    totals = _blank()
    with db.read() as conn:
        for hour, kind, n in conn.execute(stmt):
            _add(by_hour[int(hour)], kind, int(n))
            _add(totals, kind, int(n))
    rows = [{"hour": clock.iso(h), **_rates(row)} for h, row in by_hour.items()]
    return {"hours": hours, "from": clock.iso(start), "to": clock.iso(end), "totals": _rates(totals), "rows": rows}
