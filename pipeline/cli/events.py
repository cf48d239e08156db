"""`edgepipe events`."""

from __future__ import annotations
