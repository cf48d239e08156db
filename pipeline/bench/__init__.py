"""Benchmarks behind `edgepipe bench …`: beside the product, not part of its runtime.

Each benchmark reports a ratio against a reference measured in the same run, because the
machine is shared and absolute times drift. One module per benchmark (`consume`,
`snapshot`, `archive` for archive/clean/replay, `http`), `common` and `scratch` for what
they share, `cli` for the commands. They use the product through its public interfaces
only; nothing in the product imports them (`pipeline.cli` registers `cli`). Methods and
figures: docs/benchmarks.md.
"""

from __future__ import annotations
