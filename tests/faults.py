"""Fault injection around the traffic consumer, shared by the exactly-once and poison tests:
a failure after the consumer's writes and before the commit, or a consumer that dies
holding its batch."""

from __future__ import annotations

from typing import Any

from consumers.traffic import TrafficConsumer
from pipeline.bindings.queue import MessageBatch
from pipeline.config import Config
from pipeline.env import Env

NOW = "2026-11-20T12:00:00Z"
NOW_MS = 1_795_176_000_000  # NOW in epoch milliseconds


class Crash(BaseException):
    """A consumer dying mid-batch: not an Exception, so the worker does not settle; the
    transaction rolls back and the batch's leases are left to expire."""


class FaultyHandler:
    """The traffic consumer, with a failure after its writes (before the commit) on chosen
    calls, or a crash that abandons the batch."""

    def __init__(self, cfg: Config, fail: set[int], crash: set[int]) -> None:
        self.inner = TrafficConsumer(cfg).queue
        self.fail, self.crash = fail, crash
        self.calls = 0

    def __call__(self, batch: MessageBatch, env: Env, ctx: Any) -> Any:
        call = self.calls
        self.calls += 1
        report = self.inner(batch, env, ctx)
        if call in self.crash:
            raise Crash(f"consumer killed in call {call}")
        if call in self.fail:
            raise RuntimeError(f"injected failure in call {call}")
        return report
