"""Structured logs: one `key=value` line per batch or job run, on stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("edgepipe")


def setup(level: str = "INFO") -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or "=" in text or not text) else text


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, " ".join([f"event={name}", *(f"{k}={_fmt(v)}" for k, v in fields.items())]))
