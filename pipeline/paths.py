"""Path normalisation: many raw URLs, few aggregate rows.

Defaults: drop the query string and fragment, collapse repeated slashes, drop a trailing
slash (except on `/`), and replace a segment that is all digits, a UUID, or a hex string
of 16+ characters with `:id`. Case is kept. Extra regex rules from `[paths] rules` run
last, in order.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pipeline.config import Paths

_SLASHES = re.compile(r"/{2,}")
# A whole segment (between slashes) that is all digits, a UUID, or 16+ hex characters.
_ID_SEGMENT = re.compile(
    r"(?<=/)(?:\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{16,})"
    r"(?=/|$)"
)


class PathNormalizer:
    def __init__(self, cfg: Paths | None = None, cache_size: int = 65_536) -> None:
        self.cfg = cfg or Paths()
        self._rules = [(re.compile(r.pattern), r.replacement) for r in self.cfg.rules]
        self.normalize = lru_cache(maxsize=cache_size)(self._normalize)

    def _normalize(self, path: str) -> str:
        cfg = self.cfg
        if cfg.strip_query:
            path = path.split("#", 1)[0].split("?", 1)[0]
        if cfg.collapse_slashes and "//" in path:
            path = _SLASHES.sub("/", path)
        if cfg.strip_trailing_slash and len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        if cfg.replace_ids:
            path = _ID_SEGMENT.sub(lambda _match: cfg.id_placeholder, path)
        for pattern, replacement in self._rules:
            path = pattern.sub(replacement, path)
        return path or "/"
