"""Helper processes that take CPU work off a busy process (snapshot builds, half of a
replay verify). They are spawned, never forked: the parent runs threads whose locks a fork
would copy in whatever state they are in. Each talks to its parent over one pipe."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable
from typing import Any

JOIN_TIMEOUT_S = 5.0
CONTEXT = multiprocessing.get_context("spawn")


def start(target: Callable[..., None], *args: Any, name: str) -> tuple[Any, Any]:
    """Start `target(*args, conn)` in a daemon process; returns (process, this end of the
    pipe). The helper ignores SIGINT: Ctrl-C reaches the whole process group, and the
    parent decides when its helpers end."""
    here, there = CONTEXT.Pipe()
    proc = CONTEXT.Process(target=_main, args=(target, *args, there), name=name, daemon=True)
    proc.start()
    there.close()
    return proc, here


def _main(target: Callable[..., None], *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)


def end(proc: Any, conn: Any, wait: bool = True) -> None:
    """Close the pipe (a helper exits at its end of file), wait for the process, and kill
    it if it has not exited within `JOIN_TIMEOUT_S` (at once without `wait`)."""
    with contextlib.suppress(OSError):
        conn.close()
    proc.join(JOIN_TIMEOUT_S if wait else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
