"""`edgepipe demo`: N days of a deployment, simulated in seconds.

The real system runs over a simulated wall clock (`pipeline.clock.simulated`; no sleeps):
the demo producer (`pipeline.sample.DemoTraffic`: a daily curve, resent duplicates, late
events, a little poison) sends each slice of time (five minutes at 2 events/s) to the
QUEUE binding, the clock moves to the slice's end, the real worker (traffic consumer,
snapshot refresher every `snapshot_every_batches` batches) drains the queue, and at every
cron fire time the real job scheduler decides which jobs are due: archive, clean, monitor, rollup, expire, snapshot
prune each run at their simulated hour, under their leases, recorded in `job_runs`. It
runs on the configured bindings (SQLite + a local archive by default; PostgreSQL and S3 the
same) and ends at the present, with a database that looks like N days of production.

The demo consumes in batches of 1000 (with no batch timeout: the simulated producer has
already sent the slice); every other setting is the configuration's.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from pipeline import clock
from pipeline.cli import State, emit_json, main, pass_state
from pipeline.errors import ValidationError

if TYPE_CHECKING:
    from pipeline.sample import DemoTraffic

SLICE_S = 300
SEND_CHUNK = 1000
DAY_S = 86_400


def _held_events(env: Any) -> int:
    from pipeline import totals

    return int(totals.stats(env.DB)["total"]["events"])


def _detail_rows(env: Any) -> tuple[int, int | None]:
    """(detail rows in the database, the oldest one's ts)."""
    import sqlalchemy as sa

    from pipeline.schema import traffic_events

    with env.DB.read() as conn:
        n, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(traffic_events.c.ts))).one()
    return int(n), oldest


def _job_runs(env: Any, start_s: float, end_s: float) -> dict[str, int]:
    import sqlalchemy as sa

    from pipeline.schema import job_runs

    stmt = (
        sa.select(job_runs.c.job, sa.func.count())
        .where(job_runs.c.status == "succeeded", job_runs.c.scheduled_for.between(start_s, end_s))
        .group_by(job_runs.c.job)
    )
    with env.DB.read() as conn:
        return {job: int(n) for job, n in conn.execute(stmt).all()}


def _forget(env: Any, holder: str) -> None:
    from pipeline.schema import worker_heartbeats

    with env.DB.transaction() as conn:
        conn.execute(worker_heartbeats.delete().where(worker_heartbeats.c.holder == holder))


def _drain(worker: Any) -> None:
    while (result := worker.step(wait=0.0)) is not None:
        if result.transient:
            clock.sleep(result.retry_in)


@contextlib.contextmanager
def _progress(total: float, enabled: bool) -> Iterator[Callable[[float, float], None]]:
    if not enabled:
        yield lambda done, now_s: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("simulating", total=total)
        yield lambda done, now_s: bar.update(task, completed=done, description=f"simulating {clock.iso(now_s)}")


class _Simulation:
    """The demo's loop. The simulated clock moves slice by slice (`SLICE_S`, longer at low
    rates so that batches stay full) and stops at every cron fire time; the scheduler is
    asked what is due at each fire time, each whole hour (retries of failed runs) and after
    a run failed, as APScheduler asks a worker's scheduler."""

    def __init__(self, env: Any, traffic: DemoTraffic, start: float) -> None:
        from pipeline.cli.compose import consumer_worker
        from pipeline.heartbeat import Heartbeat, process_name
        from scheduler.service import JobScheduler

        self.env, self.traffic, self.t = env, traffic, start
        self.slice_s = SLICE_S * min(12, max(1, round(2 / traffic.rate)))
        # From the first archive run that covers demo traffic on, the detail rows span at
        # most detail_days + 1 days (+ the hour between the archive and the clean runs).
        self.steady = start + (env.config.retention.detail_days + 1) * DAY_S
        self.max_rows, self.max_span = 0, 0.0
        self.holder = process_name()
        self.heartbeat = Heartbeat(env.DB, self.holder, started_at=start)
        self.worker = consumer_worker(env)
        self.worker.heartbeat = self.heartbeat
        self.scheduler = JobScheduler(env, self.holder, on_run=lambda _out: self.heartbeat.job_done())

    def _watermark(self) -> int:
        from pipeline import meta

        with self.env.DB.read() as conn:
            return meta.archive_watermark_ms(self.env.DB, conn)

    def _next_fire(self) -> float:
        now = datetime.fromtimestamp(self.t, UTC)
        fires = [f.timestamp() for s in self.scheduler.specs if (f := s.next_fire(now)) is not None]
        return min(fires, default=float("inf"))

    def _sample(self) -> None:
        rows, oldest = _detail_rows(self.env)
        self.max_rows = max(self.max_rows, rows)
        if oldest is not None and self.t >= self.steady:
            self.max_span = max(self.max_span, (self.t - oldest / 1000) / DAY_S)

    def run(self, end: float, set_to: Callable[[float], None], report: Callable[[float, float], None]) -> None:
        from pipeline.cli.compose import refresh_snapshot

        start, send = self.t, self.env.QUEUE.send_batch
        watermark, next_fire, retry = self._watermark(), self._next_fire(), False
        self.heartbeat.beat(force=True)
        try:
            while self.t < end:
                t0, t1 = self.t, min(self.t + self.slice_s, end, next_fire)
                batch = self.traffic.slice(t0, t1, watermark)
                set_to(t1)
                self.t = t1
                for k in range(0, len(batch), SEND_CHUNK):
                    send(batch[k : k + SEND_CHUNK])
                _drain(self.worker)
                new_hour = t1 // 3600 > t0 // 3600
                if t1 >= next_fire or new_hour or retry:
                    self.heartbeat.beat(force=True)
                    outcomes = self.scheduler.tick()
                    retry = any(o.status == "failed" for o in outcomes)
                    if any(o.job == "archive" for o in outcomes):
                        watermark = self._watermark()
                    next_fire = self._next_fire()
                if new_hour:
                    self._sample()
                report(t1 - start, t1)
            _drain(self.worker)
            self.worker.drain()
            refresh_snapshot(self.env)  # the snapshot of the final state, for `serve`
        finally:
            self.worker.close()
            _forget(self.env, self.holder)  # the demo's stand-in worker is no process to watch


def run_demo(
    state: State,
    days: int,
    rate: float,
    seed: int,
    force: bool = False,
    progress: bool = False,
    end_s: float | None = None,
) -> dict[str, Any]:
    """Simulate `days` days ending at `end_s` (default: now, on a five-minute boundary);
    returns the summary `edgepipe demo --json` prints."""
    from pipeline import migrate, totals
    from pipeline.bindings.db import Database
    from pipeline.cli.compose import register_jobs
    from pipeline.env import open_env

    started = clock.monotonic()
    end = (clock.now_s() if end_s is None else end_s) // SLICE_S * SLICE_S
    start = end - days * DAY_S
    cfg = state.config.replace(consumer={"max_batch_size": 1000, "max_batch_timeout": 0.0})
    db = Database(cfg.bindings.db)
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    env = open_env(cfg)
    try:
        before = _held_events(env)
        if before and not force:
            raise ValidationError(
                "database", f"it already holds {before:,} events; the demo needs an empty one (--force: add to it)"
            )
        from pipeline.sample import DemoTraffic

        register_jobs()
        sim = _Simulation(env, DemoTraffic(rate, seed), start)
        with clock.simulated(start) as set_to, _progress(end - start, progress) as report:
            sim.run(end, set_to, report)
        traffic = sim.traffic
        stats = totals.stats(env.DB)
        checked = totals.verify(env.DB)
        dlq = env.QUEUE.dlq_counts()
        runs = _job_runs(env, start, end)
    finally:
        env.close()
    total = stats["total"]["events"]
    elapsed = clock.monotonic() - started
    return {
        "days": days,
        "rate": rate,
        "seed": seed,
        "start": clock.iso(start),
        "end": clock.iso(end),
        "events_sent": traffic.sent,
        "unique_events": traffic.unique,
        "duplicates_sent": traffic.duplicates,
        "invalid_sent": traffic.invalid,
        "too_late_sent": traffic.too_late,
        "hot_events": stats["hot"]["events"],
        "cold_events": stats["cold"]["events"],
        "total_events": total,
        "exact": total - before == traffic.unique,
        "dlq": dlq,
        "max_hot_events": sim.max_rows,
        "max_hot_span_days": round(sim.max_span, 3),
        "job_runs": dict(sorted(Counter(runs).items())),
        "verify_ok": checked["ok"],
        "problems": checked["problems"],
        "elapsed_s": round(elapsed, 1),
        "events_per_s": round(traffic.sent / elapsed) if elapsed else None,
    }


@main.command("demo")
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 366), help="Simulated days.")
@click.option("--rate", default=2.0, show_default=True, type=click.FloatRange(0.001, 10_000),
              help="Mean events per second (the daily curve peaks at 1.6×).")  # fmt: skip
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the simulated traffic.")
@click.option("--force", is_flag=True, help="Run on a database that already holds events (adds to them).")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def demo(state: State, days: int, rate: float, seed: int, force: bool, as_json: bool) -> None:
    """Simulate DAYS days of production in seconds: traffic, consumer, every cron job.

    Exits 6 when `verify` fails or the totals differ from the unique events sent."""
    from pipeline.cli.archive import INTEGRITY_EXIT

    result = run_demo(state, days, rate, seed, force, progress=sys.stderr.isatty() and not as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"{result['days']} days ({result['start']} → {result['end']}) in {result['elapsed_s']} s: "
            f"{result['events_sent']:,} sent ({result['duplicates_sent']:,} duplicates, "
            f"{result['invalid_sent']:,} invalid, {result['too_late_sent']:,} too late), "
            f"{result['unique_events']:,} unique"
        )
        click.echo(
            f"events: {result['hot_events']:,} hot + {result['cold_events']:,} cold = {result['total_events']:,} "
            f"total; at most {result['max_hot_events']:,} detail rows held"
        )
        click.echo("job runs: " + ", ".join(f"{job} {n}" for job, n in result["job_runs"].items()))
        for problem in result["problems"]:
            click.echo(f"FAIL {problem}")
        click.echo("verify ok" if result["verify_ok"] else "verify FAILED")
    if not (result["verify_ok"] and result["exact"]):
        sys.exit(INTEGRITY_EXIT)
