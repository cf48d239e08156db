"""The snapshot builder's helper process when its worker goes away: the worker's end of the
pipe closes (as it does when the worker is SIGKILLed) while the helper waits for a request
or while a build's reply is pending; the helper must exit with status 0 and print nothing
(no BrokenPipeError traceback on the worker's stderr)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from consumers.traffic import TrafficConsumer
from pipeline import clock
from pipeline.worker import Worker
from snapshots.builder import SnapshotBuilder
from tests.http_support import event

JOIN_S = 60  # generous: the helper only has to start Python, build once and exit


@pytest.fixture
def builder(sqlite_url: str, make_env: Any) -> Any:
    env = make_env(sqlite_url)
    env.QUEUE.send_batch([event(i) for i in range(200)])
    Worker(env, TrafficConsumer(env.config).handle_batch).run(until_empty=True)
    b = SnapshotBuilder(env.DB.url)
    yield b
    b.close(wait=False)


def _assert_quiet_exit(proc: Any, capfd: pytest.CaptureFixture[str]) -> None:
    proc.join(JOIN_S)
    assert not proc.is_alive(), "the helper did not exit after its worker went away"
    err = capfd.readouterr().err
    assert proc.exitcode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_helper_exits_quietly_when_the_worker_goes_away_with_a_reply_pending(
    builder: SnapshotBuilder, capfd: pytest.CaptureFixture[str]
) -> None:
    builder._start()  # the module's own start: procs.start(_serve, …) on a fresh pipe
    proc = builder._proc
    # Hold the helper still so that the request is in the pipe and the worker's end is
    # closed before it can answer: its reply then meets a closed pipe, whatever the timing.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        builder.submit(24, 5, clock.now_s())
        assert builder.pending
        builder._conn.close()  # what the kernel does to a SIGKILLed worker's end
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _assert_quiet_exit(proc, capfd)


def test_helper_exits_quietly_when_the_worker_goes_away_between_requests(
    builder: SnapshotBuilder, capfd: pytest.CaptureFixture[str]
) -> None:
    doc = builder.build(24, 5, clock.now_s())  # started, answered, now waiting for the next
    assert doc["paths"]
    proc = builder._proc
    builder._conn.close()
    _assert_quiet_exit(proc, capfd)
