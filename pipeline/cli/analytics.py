"""`edgepipe analytics`."""

from __future__ import annotations
