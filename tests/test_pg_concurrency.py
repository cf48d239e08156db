"""Several workers on one PostgreSQL database never deadlock on the rows they all add to: every
multi-row upsert (and the insert of events) takes its row locks in key order (see
pipeline/bindings/db/bulk.py).

Two deterministic checks pin the mechanism down: a statement held in the middle of its rows
(a trigger waiting on an advisory lock the test holds) while a second one wants the same
rows, once through `Database.upsert_add_rows` (the second waits, then both commit) and once
as a hand-written upsert of the same rows unsorted (PostgreSQL finds the deadlock and aborts
one). Then four worker processes consume one queue whose batches all add to the same 20
paths in the same hour: every batch must commit at its first attempt (a deadlock would be a
transient failure: `StepResult.ok` false), and the aggregates must be exact."""

from __future__ import annotations

import multiprocessing
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from consumers.traffic import TrafficConsumer
from pipeline import log, migrate
from pipeline.aggregate import AGG_COLUMNS, AGG_KEYS
from pipeline.bindings.db import Database, bulk
from pipeline.config import Config
from pipeline.env import Env, open_env
from pipeline.errors import TransientError
from pipeline.schema import path_stats_hourly as psh
from pipeline.worker import Worker
from tests.support import scratch_db
from tests.traffic_truth import Truth, assert_aggregates_equal, expected_aggregates

pytestmark = pytest.mark.postgres

HOUR = (int(time.time()) - 7200) // 3600 * 3600  # the start of an hour past, epoch seconds
PAUSE = 4242  # the advisory lock the trigger waits on
WAIT_S = 30  # the longest any step of a test waits for another process or thread


def env_on(url: str, tmp: Path, batch_size: int = 100) -> Env:
    cfg = Config().replace(
        bindings={"db": url, "archive": f"file://{tmp / 'archive'}"},
        consumer={"max_batch_size": batch_size, "max_batch_timeout": 0, "snapshot_every_batches": 0},
    )
    return open_env(cfg, check_schema=False)


@pytest.fixture
def pg_url(pg_server_url: str, tmp_path: Path) -> Iterator[str]:
    """A migrated scratch schema."""
    with scratch_db(pg_server_url, tmp_path) as url:
        env = env_on(url, tmp_path)
        migrate.upgrade(env.DB)
        env.close()
        yield url


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


# -- two statements on the same rows ------------------------------------------------------


def hourly_row(path: str) -> tuple[Any, ...]:
    """An hourly row (AGG_KEYS + AGG_COLUMNS) of one GET of `path` in 200 ms."""
    values = dict.fromkeys(AGG_COLUMNS, 0) | {
        "requests": 1, "status_2xx": 1, "rt_sum_ms": 200.0, "rt_min_ms": 200.0, "rt_max_ms": 200.0, "lat_le_200": 1,
    }  # fmt: skip
    return (HOUR, "", path, "GET", *values.values())


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(AGG_KEYS + AGG_COLUMNS, row, strict=True))


class Session:
    """A transaction of its own (its own Database, so its own connection) in a thread:
    `run(write)` runs `write(db, conn)` in it and commits; `pid` is its server process."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.pid: int | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def run(self, write: Callable[[Database, sa.Connection], None]) -> None:
        def body() -> None:
            try:
                with self.db.transaction() as conn:
                    self.pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                    write(self.db, conn)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "a transaction never finished"
        self.db.dispose()


def waiting_on(admin: sa.Connection, session: Session, event: str) -> bool:
    """Whether `session`'s statement waits for a lock (`event`: PostgreSQL's wait event)."""
    if session.pid is None:
        return False
    row = admin.execute(
        sa.text("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = :pid"), {"pid": session.pid}
    ).first()
    return row is not None and row[0] == "Lock" and (event == "any" or row[1] == event)


def race(url: str, first: Callable[[Database, sa.Connection], None], second: Callable[..., None]) -> list[Session]:
    """`first` runs until its trigger pauses it at the row of path /pause; then `second`
    runs until it waits for a row lock; then `first` goes on. Returns both sessions, ended."""
    admin_engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")  # a fresh look at pg_stat_activity each time
    try:
        with admin_engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PAUSE})
            a, b = Session(url), Session(url)
            a.run(first)
            wait_until(lambda: waiting_on(admin, a, "advisory"), "the first statement to pause at /pause")
            b.run(second)
            wait_until(lambda: waiting_on(admin, b, "any"), "the second statement to wait for a row lock")
            admin.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PAUSE})
            a.join()
            b.join()
            return [a, b]
    finally:
        admin_engine.dispose()


@pytest.fixture
def paused_rows(pg_url: str) -> Iterator[str]:
    """Rows of /a and /b stored, and a trigger that holds any statement writing the row of
    /pause until the advisory lock PAUSE is free (it fires before the row's conflict check,
    so after the rows ordered before it are locked)."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(psh), [dict(zip(AGG_KEYS + AGG_COLUMNS, hourly_row(p), strict=True)) for p in ("/a", "/b")]
        )
        conn.exec_driver_sql(
            "CREATE FUNCTION test_pause() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.path = '/pause' THEN PERFORM pg_advisory_xact_lock_shared({PAUSE}); END IF; "
            "RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER test_pause BEFORE INSERT ON path_stats_hourly FOR EACH ROW EXECUTE FUNCTION test_pause()"
        )
    engine.dispose()
    yield pg_url


def requests_of(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(psh.c.path, psh.c.requests)).all())
    engine.dispose()
    return got


@pytest.mark.parametrize("staged", [False, True], ids=["one statement", "staging table"])
def test_upserts_of_the_same_rows_in_other_orders_wait_for_each_other(
    paused_rows: str, staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first statement is given /b, /pause, /a and the second /a, /b: sorted, the first
    holds /a and /b when it pauses, the second waits for /a, and both commit."""
    monkeypatch.setattr(bulk, "STAGE_MIN_ROWS", 1 if staged else 10**9)

    def upsert(paths: list[str]) -> Callable[[Database, sa.Connection], None]:
        def write(db: Database, conn: sa.Connection) -> None:
            rows = [hourly_row(p) for p in paths]
            db.upsert_add_rows(conn, psh, AGG_KEYS + AGG_COLUMNS, rows, AGG_KEYS, ["rt_min_ms"], ["rt_max_ms"])

        return write

    sessions = race(paused_rows, upsert(["/b", "/pause", "/a"]), upsert(["/a", "/b"]))
    assert [s.error for s in sessions] == [None, None]
    assert requests_of(paused_rows) == {"/a": 3, "/b": 3, "/pause": 1}


def test_the_same_upserts_unsorted_deadlock(paused_rows: str) -> None:
    """The control: the same two upserts, hand-written to take their rows in the order
    given (a VALUES list). The first holds /b when it pauses, the second takes /a and waits
    for /b, the first then wants /a: PostgreSQL aborts one of them."""

    def upsert(paths: list[str]) -> Callable[[Database, sa.Connection], None]:
        def write(db: Database, conn: sa.Connection) -> None:
            stmt = pg_insert(psh).values([dict(zip(AGG_KEYS + AGG_COLUMNS, hourly_row(p), strict=True)) for p in paths])
            conn.execute(
                stmt.on_conflict_do_update(index_elements=list(AGG_KEYS), set_={"requests": psh.c.requests + 1})
            )

        return write

    sessions = race(paused_rows, upsert(["/b", "/pause", "/a"]), upsert(["/a", "/b"]))
    errors = [s.error for s in sessions if s.error is not None]
    assert len(errors) == 1 and isinstance(errors[0], TransientError), [s.error for s in sessions]
    assert "deadlock detected" in str(errors[0])


# -- four workers, one queue, the same 20 paths --------------------------------------------

PATHS = [f"/p{i:02d}" for i in range(20)]
METHODS = ("GET", "POST", "PUT", "DELETE")
WORKERS = 4


def events(n: int, seed: int) -> list[tuple[dict[str, Any], Truth]]:
    """`n` events of the 20 paths and 4 methods in the hour HOUR, in random order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = HOUR * 1000 + rng.randrange(3_600_000)
        path, method = rng.choice(PATHS), rng.choice(METHODS)
        status, rt, nbytes = (
            rng.choice((200, 201, 304, 404, 500)),
            round(rng.uniform(0.5, 900), 3),
            rng.randrange(10**5),
        )
        body = {"id": f"e{i}", "ts": ts, "method": method, "path": path, "status": status, "response_time_ms": rt,
                "bytes": nbytes}  # fmt: skip
        out.append((body, Truth(ts, f"e{i}", HOUR, "", path, method, status, rt, nbytes)))
    return out


def consume(url: str, tmp: str, batch_size: int, staged: bool, start: Any, results: Any) -> None:
    """A worker process, pipelined as `edgepipe worker` is (a batch's commit in flight while
    it takes the next): wait for the others, then take batches until the queue is empty;
    put (messages, ok, transient, error) of every batch it reports in `results`. `staged`:
    hourly rows go through the staging table whatever their number."""
    log.setup("WARNING")
    bulk.STAGE_MIN_ROWS = 1 if staged else 10**9
    outcomes: list[tuple[int, bool, bool, str | None]] = []
    try:
        env = env_on(url, Path(tmp), batch_size)
        worker = Worker(env, TrafficConsumer(env.config).handle_batch, pipelined=True)
        worker.on_batch.append(lambda r: outcomes.append((r.messages, r.ok, r.transient, r.error)))
        start.wait(WAIT_S)
        while worker.step(wait=0) is not None:
            pass
        worker.close()
        env.close()
    except Exception as exc:
        outcomes.append((0, False, False, f"{type(exc).__name__}: {exc}"))
    finally:
        results.put(outcomes)


@pytest.mark.parametrize(("batch_size", "staged"), [(30, False), (200, True)], ids=["one statement", "staging table"])
def test_four_workers_adding_to_the_same_paths_never_deadlock(
    pg_url: str, tmp_path: Path, batch_size: int, staged: bool
) -> None:
    """Batches of 30 events make ~25 hourly rows each, upserted from JSON, their events
    inserted by an upsert; batches of 200 ~70, through the staging table, their events
    (after the first batch) by COPY. Every batch adds to rows the other workers' batches add
    to at the same time, each in its own shuffled order."""
    env = env_on(pg_url, tmp_path, batch_size)
    pairs = events(2400, seed=batch_size)
    env.QUEUE.send_batch([body for body, _ in pairs])
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=consume, args=(pg_url, str(tmp_path), batch_size, staged, start, results), daemon=True)
        for _ in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        per_worker = [results.get(timeout=120) for _ in procs]
    except queue.Empty:
        pytest.fail("a worker process did not report")
    finally:
        for proc in procs:
            proc.join(WAIT_S)
            if proc.is_alive():
                proc.kill()

    outcomes = [step for steps in per_worker for step in steps]
    failed = [o for o in outcomes if not o[1]]
    assert failed == [], failed  # every batch committed whole at its first attempt: no deadlock, no retry
    assert sum(o[0] for o in outcomes) == len(pairs)
    assert sum(1 for steps in per_worker if steps) >= 2  # the batches did overlap
    with env.DB.read() as conn:
        per_path = dict(conn.execute(sa.select(psh.c.path, sa.func.sum(psh.c.requests)).group_by(psh.c.path)).all())
    assert per_path == Counter(t.path for _, t in pairs)
    assert_aggregates_equal(env.DB, expected_aggregates(t for _, t in pairs))
    assert env.QUEUE.stats()["pending"] == 0
    env.close()
