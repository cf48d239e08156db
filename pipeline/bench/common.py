"""What several benchmarks share: a meter of wall-clock and CPU seconds, a slice of
consuming, filling a queue and the percentile they report. Light on imports: the archive
benchmark's child processes load it, and their peak RSS is what they report (the throwaway
database, which needs SQLAlchemy, is `pipeline.bench.scratch`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pipeline import clock

if TYPE_CHECKING:
    from pipeline.bindings.queue import Queue
    from pipeline.worker import StepResult, Worker

SEND_CHUNK = 5000  # events per `send_batch` when filling a queue
SLICE_EVENTS = 20_000  # events per turn when two sides race (see `pipeline.bench.consume.race`)

Progress = Callable[[str], None]


def quiet(_message: str) -> None:
    """The default progress callback: says nothing."""


def db_kind(url: str | None) -> str:
    """The database a benchmark ran on, `sqlite` or `postgresql` (None: the temp SQLite file)."""
    return "sqlite" if url is None or url.startswith("sqlite") else "postgresql"


def send_events(queue: Queue, events: Sequence[dict[str, Any]]) -> None:
    """Enqueue `events`, one per message, `SEND_CHUNK` to a `send_batch`."""
    for i in range(0, len(events), SEND_CHUNK):
        queue.send_batch(events[i : i + SEND_CHUNK])


class Meter:
    """Wall-clock and process CPU seconds, summed over the slices one side ran."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        wall, cpu = clock.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.wall += clock.monotonic() - wall
            self.cpu += time.process_time() - cpu


def consume_slice(worker: Worker, n: int, latencies: list[float]) -> tuple[int, int]:
    """Run batches until `n` messages were consumed or the queue is empty: (messages,
    events inserted); each batch's latency is appended to `latencies`. Batches count as
    the worker reports them (a pipelined worker: once their commit is confirmed, the last
    one at `flush`). A WAL checkpoint the slice asked of the DB binding's background thread
    is waited for before returning: it is the slice's work, and whatever runs next gets the
    disk alone."""
    reported: list[StepResult] = []
    worker.on_batch.append(reported.append)
    messages = 0
    try:
        while messages < n and (result := worker.step(wait=0.0)) is not None:
            if not result.ok:
                raise RuntimeError(f"batch failed during the benchmark: {result.error}")
            messages += result.messages
        worker.flush()
    finally:
        worker.on_batch.remove(reported.append)
    failed = [r for r in reported if not r.ok]
    if failed:
        raise RuntimeError(f"batch failed during the benchmark: {failed[0].error}")
    latencies += [r.ms for r in reported]
    worker.env.DB.wait_checkpoints()
    return messages, sum(r.report.inserted for r in reported)


def percentile(values: list[float], q: float) -> float:
    """The `q`th percentile (1-99) of `values`, to 0.01; 0.0 when there are none."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 2)
