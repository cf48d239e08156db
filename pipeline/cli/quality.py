"""`edgepipe quality`."""

from __future__ import annotations
