"""`edgepipe ingest FILE --resume`: an ingest that died part-way (its queue failing, or its
process killed) and is resumed enqueues nothing twice, and after the real consumer the
aggregates hold every event of the file exactly once — lines without an `id` included,
since a file gives them `<file hash>:<line>`. A plain re-run of a file is deduplicated the
same way; stdin, which keeps the queue message id, is the counter-example that shows the
comparison can fail. Checked against the independent oracle in tests/traffic_truth.py.

First, the ingest's fast path (lines decoded straight into a typed struct, checked in
bulk, enqueued as they are) against `parse_event` on the decoded line: the same verdict,
the same error message, and a stored body holding the same value."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.test_events as ev
from pipeline import clock
from pipeline.bindings.queue import Queue, encode_body
from pipeline.env import Env
from pipeline.errors import BindingError, ValidationError
from pipeline.events import parse_event
from pipeline.paths import PathNormalizer
from pipeline.producer import IngestResult, Source, ingest, ingest_file
from pipeline.schema import traffic_events
from tests.conftest import MakeEnv, run_cli
from tests.traffic_truth import Truth, assert_aggregates_equal, expected_aggregates, make_events, stored_event_keys

N = 3500  # events: three full sends of 1000 and a partial one


# -- the fast path judges as parse_event does --------------------------------------------------


class Recorder:
    """A queue that keeps the bodies it is sent, encoded as the queue stores them."""

    shares_transaction = False

    def __init__(self) -> None:
        self.stored: list[bytes] = []

    def send_batch(self, bodies: Any) -> list[str]:
        self.stored += [encode_body(body)[0] for body in bodies]
        return [str(i) for i, _ in enumerate(bodies)]


def expected(line: bytes, fallback: str, keyed: bool) -> Any:
    """What ingest must do with `line`: the stored value, the rejection's text, or None (a
    blank line), from orjson and `parse_event` alone."""
    if not line.strip():
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"line: malformed JSON: {exc}"
    try:
        event = parse_event(value, ev.NORM, ev.NOW_MS, fallback)
    except ValidationError as exc:
        return str(exc)
    if keyed and event.id == fallback:
        value["id"] = fallback
    return value


LAYOUTS = {
    "compact": lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
    "spaced": lambda obj: json.dumps(obj),  # ", " and ": ", non-ASCII escaped
    "padded": lambda obj: f"  {json.dumps(obj, separators=(',', ':'))} \t",
}
EDGES = [*ev.EDGES, 2**40, 2**40 + 1, 86_400_000, 86_400_000.5, 1e15, "\x00", "a\x00", "/a\x00b", "/" + "a" * 2047,
         "/" + "a" * 2048, "POST", "OPTIONS", "PROPFIND", "é/\u2028", "/caf\u00e9"]  # fmt: skip


def judged(raws: list[bytes], keyed: bool) -> None:
    """Ingest `raws` as the lines of one input and check each line's fate against `expected`."""
    identity = "0123456789abcdef" * 4 if keyed else None
    queue = Recorder()
    with clock.simulated(ev.NOW_MS / 1000):  # a frozen "now", without freezegun's cost per call
        result = ingest(enumerate(raws, 1), queue, ev.NORM, source=Source(identity))  # type: ignore[arg-type]
    want = [(n, expected(raw, f"{identity[:16]}:{n}" if identity else "-", keyed)) for n, raw in enumerate(raws, 1)]
    assert result.rejected == [(n, w) for n, w in want if isinstance(w, str)]
    assert [orjson.loads(body) for body in queue.stored] == [w for _, w in want if isinstance(w, dict)]
    assert result.enqueued == len(queue.stored)


@pytest.mark.parametrize("keyed", [False, True], ids=["stdin", "file"])
def test_the_fast_path_agrees_at_every_edge(keyed: bool) -> None:
    """Each field of an event of the common shape set to each edge value, in each layout,
    with and without an id: each value's lines through an ingest of their own (the bulk
    check passing or failing as a whole), then all 3,000 through one (the bulk check
    meeting lines it must refuse among those it takes)."""
    groups = []
    for field in ev.FIELDS:
        for value in EDGES:
            obj = ev.good(**{"method": "GET", "path": "/users/42", field: value})
            lines = [{k: v for k, v in obj.items() if not (drop_id and k == "id")} for drop_id in (False, True)]
            groups.append([LAYOUTS[name](line).encode("utf-8", "surrogatepass") for name in LAYOUTS for line in lines])
    for raws in groups:
        judged(raws, keyed)
    everything = [raw for raws in groups for raw in raws]
    assert len(everything) > 3000
    judged(everything, keyed)


LINE = st.tuples(
    st.dictionaries(st.sampled_from(ev.FIELDS), ev.ODD_VALUES, max_size=3),
    st.booleans(),
    st.sampled_from(sorted(LAYOUTS)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, min_size=1, max_size=8), st.booleans())
def test_the_fast_path_judges_every_line_as_parse_event_does(lines: list[Any], keyed: bool) -> None:
    """Several fields replaced by arbitrary JSON values, a few lines at a time."""
    raws: list[bytes] = []
    for changes, drop_id, layout in lines:
        obj = ev.good(**({"method": "GET", "path": "/users/42"} | changes))
        if drop_id:
            obj.pop("id", None)
        raws.append(LAYOUTS[layout](obj).encode("utf-8", "surrogatepass"))
    judged(raws, keyed)


class Written:
    """What `write_file` wrote: the truths of the valid events, their line numbers, and the
    numbers of the invalid lines."""

    def __init__(self, truths: list[Truth], valid: list[int], invalid: list[int]) -> None:
        self.truths, self.valid, self.invalid = truths, valid, invalid

    def invalid_after(self, line: int) -> list[int]:
        return [n for n in self.invalid if n > line]


def write_file(path: Path, n: int = N, seed: int = 5) -> Written:
    """`n` events as NDJSON: every 4th without an `id`, every 2nd without the unknown field
    (so that both the fast path and `parse_event` see lines of both kinds), plus a blank
    line and an invalid line now and then."""
    pairs = make_events(seed=seed, n=n, now_ms=clock.now_ms() - 60_000)
    lines: list[bytes] = []
    valid: list[int] = []
    invalid: list[int] = []
    for i, (body, _) in enumerate(pairs):
        if i % 700 == 350:
            lines.append(orjson.dumps(body | {"status": 999}))
            invalid.append(len(lines))
        if i % 900 == 10:
            lines.append(b"")
        if i % 4 == 0:
            body = {k: v for k, v in body.items() if k != "id"}
        if i % 2 == 0:
            body = {k: v for k, v in body.items() if k != "user_agent"}
        lines.append(orjson.dumps(body))
        valid.append(len(lines))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return Written([t for _, t in pairs], valid, invalid)


def consume(env: Env) -> None:
    """The real worker, to the end of the queue."""
    out = orjson.loads(run_cli(env, "--log-level", "ERROR", "consume", "--until-empty", "--json").stdout)
    assert (out["pending"], out["in_flight"], out["dlq"]) == (0, 0, 0), out


def assert_stored_once(env: Env, truths: list[Truth]) -> None:
    assert len(stored_event_keys(env.DB)) == len(truths)
    assert_aggregates_equal(env.DB, expected_aggregates(truths))


def ingest_cli(env: Env, *args: str, stdin: bytes | None = None) -> tuple[int, dict[str, Any], str]:
    """`edgepipe ingest ARGS --json` in process on `env`'s database: (exit code, the JSON
    report, stderr)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    cfg = env.config
    environ = {"EDGEPIPE_BINDINGS__DB": cfg.bindings.db, "EDGEPIPE_BINDINGS__ARCHIVE": cfg.bindings.archive,
               "EDGEPIPE_CLEANER__STATS_FILE": cfg.cleaner.stats_file}  # fmt: skip
    argv = ["--log-level", "ERROR", "ingest", *args, "--json"]
    result = CliRunner().invoke(main, argv, env=environ, input=stdin, catch_exceptions=False)
    return result.exit_code, orjson.loads(result.stdout) if result.stdout else {}, result.stderr


class FailingQueue:
    """The real queue, failing on its `fail_on`-th send: before writing anything, or (with
    `after_commit`) once the send has committed. The latter does not join the DB binding's
    transaction, so the send commits on its own and the producer's checkpoint of it is
    never written: the window a kill between the two would hit on a queue of another kind."""

    def __init__(self, real: Queue, fail_on: int, after_commit: bool) -> None:
        self.real, self.fail_on, self.after_commit = real, fail_on, after_commit
        self.shares_transaction = real.shares_transaction and not after_commit
        self.sends = 0

    def send_batch(self, bodies: Any) -> list[str]:
        self.sends += 1
        if self.sends == self.fail_on and not self.after_commit:
            raise BindingError("queue unavailable: injected before the send")
        ids = self.real.send_batch(bodies)
        if self.sends == self.fail_on:
            raise BindingError("queue unavailable: injected after the send committed")
        return ids


def fail_part_way(env: Env, source: Path, fail_on: int, after_commit: bool) -> IngestResult:
    """`edgepipe ingest SOURCE` in process, on a queue failing on its `fail_on`-th send."""
    result = IngestResult()
    queue = FailingQueue(env.QUEUE, fail_on, after_commit)
    with source.open("rb") as stream, pytest.raises(BindingError, match="injected"):
        ingest_file(stream, queue, PathNormalizer(env.config.paths), env.DB, result=result)
    return result


@pytest.mark.parametrize("after_commit", [False, True], ids=["send-failed", "checkpoint-lost"])
def test_a_failed_ingest_resumed_counts_every_event_once(env: Env, tmp_path: Path, after_commit: bool) -> None:
    source = tmp_path / "events.ndjson"
    file = write_file(source)
    got = fail_part_way(env, source, fail_on=3, after_commit=after_commit)
    checkpoint = file.valid[1999]  # two sends went through, with their checkpoints
    assert (got.enqueued, got.last_line) == (2000, checkpoint)
    assert env.QUEUE.stats()["pending"] == (3000 if after_commit else 2000)

    code, out, stderr = ingest_cli(env, str(source), "--resume")
    again = file.invalid_after(checkpoint)  # the invalid lines after the checkpoint are reported again
    assert len(again) == 2 and code == 3, stderr
    assert out == {"enqueued": N - 2000, "rejected": 2, "resumed_after": checkpoint}
    assert [line.split(":")[0] for line in stderr.splitlines()] == [f"line {n}" for n in again]
    # Nothing twice: the failed send goes again only when it had committed unseen.
    assert env.QUEUE.stats()["pending"] == N + (1000 if after_commit else 0)

    consume(env)
    assert_stored_once(env, file.truths)


def test_events_without_an_id_are_keyed_by_the_file_and_line(env: Env, tmp_path: Path) -> None:
    """A plain re-run of the same file gives every event the same key: the consumer stores
    each once. The id-less ones carry `<sha256 of the file, 16 hex>:<line>`."""
    source = tmp_path / "events.ndjson"
    file = write_file(source, n=1200)
    for _ in range(2):
        code, out, _ = ingest_cli(env, str(source))
        assert (code, out) == (3, {"enqueued": 1200, "rejected": len(file.invalid)})
    assert env.QUEUE.stats()["pending"] == 2400
    consume(env)
    assert_stored_once(env, file.truths)

    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    with env.DB.read() as conn:
        keyed = sorted(conn.execute(sa.select(traffic_events.c.id).where(traffic_events.c.id.like(f"{prefix}:%"))))
    assert sorted(int(k.split(":")[1]) for (k,) in keyed) == file.valid[::4]


def test_stdin_keeps_the_message_id_so_the_oracle_sees_a_double(env: Env, tmp_path: Path) -> None:
    """The counter-example: from stdin an id-less event takes its message id, so the same
    input read twice counts those events twice — and the comparison notices."""
    source = tmp_path / "events.ndjson"
    file = write_file(source, n=400)
    for _ in range(2):
        _, out, _ = ingest_cli(env, "-", stdin=source.read_bytes())
        assert out == {"enqueued": 400, "rejected": 1}
    consume(env)
    assert len(stored_event_keys(env.DB)) == 500  # the 100 id-less events, twice
    with pytest.raises(AssertionError):
        assert_aggregates_equal(env.DB, expected_aggregates(file.truths))


def test_resume_on_stdin_is_refused(env: Env, tmp_path: Path) -> None:
    source = tmp_path / "events.ndjson"
    write_file(source, n=10)
    code, out, stderr = ingest_cli(env, "-", "--resume", stdin=source.read_bytes())
    assert (code, out) == (3, {})
    assert stderr == "edgepipe: --resume: needs a FILE: stdin or a pipe cannot be resumed\n"
    assert env.QUEUE.stats()["pending"] == 0


def test_resume_without_a_checkpoint_starts_at_the_first_line(env: Env, tmp_path: Path) -> None:
    source = tmp_path / "events.ndjson"
    write_file(source, n=300)
    code, out, _ = ingest_cli(env, str(source), "--resume")
    assert (code, out) == (0, {"enqueued": 300, "rejected": 0, "resumed_after": 0})


def test_a_finished_file_resumes_to_nothing_and_a_changed_one_starts_over(env: Env, tmp_path: Path) -> None:
    source = tmp_path / "events.ndjson"
    file = write_file(source, n=1100)
    assert ingest_cli(env, str(source))[0] == 3
    lines = source.read_bytes().count(b"\n")
    code, out, stderr = ingest_cli(env, str(source), "--resume")
    assert (code, out, stderr) == (0, {"enqueued": 0, "rejected": 0, "resumed_after": lines}, "")

    with source.open("ab") as f:  # another file now: its old checkpoint does not apply
        f.write(orjson.dumps(make_events(seed=9, n=1, now_ms=clock.now_ms() - 60_000)[0][0]) + b"\n")
    code, out, _ = ingest_cli(env, str(source), "--resume")
    assert (code, out) == (3, {"enqueued": 1101, "rejected": len(file.invalid), "resumed_after": 0})
    assert env.QUEUE.stats()["pending"] == 1100 + 1101


# -- a real process, killed ------------------------------------------------------------------

CHILD = """
import os, signal, sys
from pipeline.bindings.queue_sql import SqlQueue
from pipeline.cli import main

real, sends = SqlQueue.send_batch, []

def send_batch(self, bodies):
    ids = real(self, bodies)
    sends.append(len(ids))
    if len(sends) == int(sys.argv[2]):  # its rows written, the transaction not committed
        os.kill(os.getpid(), signal.SIGKILL)
    return ids

SqlQueue.send_batch = send_batch
main(["--log-level", "ERROR", "ingest", sys.argv[1]])
"""


def test_an_ingest_killed_in_a_send_resumes_after_the_last_committed_one(make_env: MakeEnv, tmp_path: Path) -> None:
    """`edgepipe ingest FILE` in a child process that SIGKILLs itself inside its third
    send (the rows written, not committed): the first two sends and their checkpoint
    survive, the third leaves nothing; `--resume` sends the rest, once."""
    env = make_env(f"sqlite:///{tmp_path / 'edgepipe.db'}")
    source = tmp_path / "events.ndjson"
    file = write_file(source)
    cfg = env.config
    environ = {"EDGEPIPE_BINDINGS__DB": cfg.bindings.db, "EDGEPIPE_BINDINGS__ARCHIVE": cfg.bindings.archive,
               "EDGEPIPE_CLEANER__STATS_FILE": cfg.cleaner.stats_file, "PATH": "/usr/bin:/bin"}  # fmt: skip
    child = subprocess.run([sys.executable, "-c", CHILD, str(source), "3"], env=environ, cwd=tmp_path,
                           capture_output=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert env.QUEUE.stats()["pending"] == 2000

    code, out, _ = ingest_cli(env, str(source), "--resume")
    checkpoint = file.valid[1999]
    rejected = len(file.invalid_after(checkpoint))
    assert (code, out) == (3, {"enqueued": N - 2000, "rejected": rejected, "resumed_after": checkpoint})
    assert env.QUEUE.stats()["pending"] == N
    consume(env)
    assert_stored_once(env, file.truths)


def test_a_files_identity_is_its_content(tmp_path: Path) -> None:
    """The key an id-less line gets does not depend on where the file lies, only on what it holds."""
    from pipeline.producer import file_identity

    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    a.write_bytes(b'{"x": 1}\n')
    b.write_bytes(b'{"x": 1}\n')
    with a.open("rb") as fa, b.open("rb") as fb:
        ida, idb = file_identity(fa), file_identity(fb)
        assert fa.tell() == 0
    assert ida == idb and ida is not None and re.fullmatch(r"[0-9a-f]{64}", ida)
