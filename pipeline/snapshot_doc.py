"""The KV snapshot as its readers see it (the HTTP read API, `edgepipe snapshot show`): the
key `snapshot:latest` always holds a complete copy of the newest version, which the
`snapshots` package publishes. Readers need only this contract, not the publisher."""

from __future__ import annotations

from typing import Any

from pipeline.bindings.kv import KV

LATEST_KEY = "snapshot:latest"


def read_latest(kv: KV | None) -> dict[str, Any] | None:
    """The newest published snapshot, or None before the first refresh (or without a KV)."""
    if kv is None:
        return None
    doc: dict[str, Any] | None = kv.get(LATEST_KEY, type="json")
    return doc
