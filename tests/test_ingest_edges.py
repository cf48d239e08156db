"""`edgepipe ingest` at its edges: a JSON array parsed as it streams (the same events as
NDJSON, in bounded memory, a malformed tail after good elements, numbers kept as they
were), one event too large for a queue message rejected alone with its line number, and a
queue that fails part-way saying how far the ingest got. In process, with click's CliRunner,
on a SQLite env; the array tests run on ijson's compiled backend and its pure-Python one."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson
import orjson
import pytest

from pipeline import clock, producer
from pipeline.bindings.queue import MAX_MESSAGE_BYTES
from pipeline.bindings.queue_sql import SqlQueue
from pipeline.env import Env
from pipeline.errors import BindingError, ValidationError
from pipeline.producer import read_records
from tests.conftest import MakeEnv, run_cli
from tests.traffic_truth import make_events

HOUR_MS = 3_600_000
BACKENDS = ["yajl2_c", "python"]
TOO_LARGE = f"event: larger than the {MAX_MESSAGE_BYTES}-byte message limit"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Parse arrays with this ijson backend (the compiled one is skipped where it is missing)."""
    try:
        chosen = ijson.get_backend(request.param)
    except ImportError:
        pytest.skip(f"ijson backend {request.param} not available")
    monkeypatch.setattr(producer, "IJSON", chosen)
    return str(request.param)


@pytest.fixture
def env(make_env: MakeEnv, tmp_path: Path) -> Env:
    return make_env(f"sqlite:///{tmp_path / 'edgepipe.db'}")


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "ts": clock.now_ms() - 60_000 - i, "method": "GET", "path": f"/p/{i}", "status": 200,
            "response_time_ms": 1.5} | extra  # fmt: skip


def ndjson(raws: list[bytes]) -> bytes:
    return b"".join(r + b"\n" for r in raws)


def array(raws: list[bytes]) -> bytes:
    return b"[" + b",\n ".join(raws) + b"]\n"


def ingest(env: Env, tmp_path: Path, data: bytes, *args: str) -> Any:
    source = tmp_path / "events.in"
    source.write_bytes(data)
    return run_cli(env, "--log-level", "ERROR", "ingest", str(source), *args)


def queued(env: Env) -> list[bytes]:
    """The bodies in the queue, as stored, in enqueue order."""
    return [m.raw for m in env.QUEUE.receive(100_000).messages]


def rejected_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("line ")]


# -- a JSON array, streamed -------------------------------------------------------------------


def test_an_array_gives_the_same_events_and_counts_as_ndjson(backend: str, make_env: MakeEnv, tmp_path: Path) -> None:
    """Beyond one send (1000 events), with invalid elements, escapes, unicode, nested
    unknown fields and numbers in every form: the messages are byte for byte those of
    the same records as NDJSON, and the same lines are rejected for the same reasons."""
    now = clock.now_ms()
    raws = [orjson.dumps(b) for b, _ in make_events(seed=11, n=2100, now_ms=now - 60_000, span_ms=HOUR_MS)]
    raws[10] = orjson.dumps(orjson.loads(raws[10]) | {"status": 999})
    raws[1500] = b'{"method": "GET"}'
    raws[20] = (b'{"id": "esc", "ts": %d, "method": "get", "path": "/caf\\u00e9/\\ud83d\\ude00", "status": 201,'
                b' "response_time_ms": 2, "note": "tab\\t \\"q\\" \\/ \\\\", "meta": {"a": [1, -0, 2.5, 1e2, 1E-3,'
                b' "x", null, true, false, {}], "neg": -9223372036854775807},'
                b' "bytes": 0, "host": "\xc3\xa9.example"}' % (now - 5))  # fmt: skip
    raws.append(b'"not an object"')
    raws.append(b"[1, 2]")
    as_ndjson, as_array = make_env(f"sqlite:///{tmp_path / 'a.db'}"), make_env(f"sqlite:///{tmp_path / 'b.db'}")
    by_line = ingest(as_ndjson, tmp_path, ndjson(raws), "--json")
    by_element = ingest(as_array, tmp_path, array(raws), "--json")
    assert by_line.exit_code == by_element.exit_code == 3, by_element.output
    assert orjson.loads(by_element.stdout) == orjson.loads(by_line.stdout) == {"enqueued": 2098, "rejected": 4}
    assert rejected_lines(by_element) == rejected_lines(by_line)
    assert [line.split(":")[0] for line in rejected_lines(by_element)] == ["line 11", "line 1501", "line 2101",
                                                                           "line 2102"]  # fmt: skip
    messages = queued(as_array)
    assert messages == queued(as_ndjson)
    assert len(messages) == 2098
    special = orjson.loads(next(m for m in messages if m.startswith(b'{"id":"esc"')))
    assert special["path"] == "/café/😀" and special["host"] == "é.example"
    assert special["meta"]["a"] == [1, 0, 2.5, 100.0, 0.001, "x", None, True, False, {}]
    assert [type(v) for v in special["meta"]["a"][:5]] == [int, int, float, float, float]
    assert special["meta"]["neg"] == -(2**63) + 1


def test_array_numbers_keep_their_types(backend: str) -> None:
    """ints stay ints (epoch ms, status, bytes), fractions and exponents are floats, never
    Decimal; the compiled backend's 64-bit integers cover every field an event has."""
    data = b'[{"ts": 1700000000123, "status": 200, "bytes": 0, "response_time_ms": 12.5, "a": 1e2, "b": -0, "c": -7}]'
    ((number, value),) = list(read_records(io.BufferedReader(io.BytesIO(data))))
    assert number == 1
    assert value == {"ts": 1700000000123, "status": 200, "bytes": 0, "response_time_ms": 12.5, "a": 100.0, "b": 0,
                     "c": -7}  # fmt: skip
    types = {k: type(v) for k, v in value.items()}
    assert types == {"ts": int, "status": int, "bytes": int, "response_time_ms": float, "a": float, "b": int, "c": int}


def test_a_huge_integer_is_refused_not_converted(backend: str, env: Env, tmp_path: Path) -> None:
    """An integer beyond 64 bits is never turned into a float (as orjson does when it
    decodes one): the compiled parser stops the array there, the pure-Python one decodes
    it exactly and the queue refuses that event alone."""
    huge = 123456789012345678901234567890
    raws = [orjson.dumps(event(1)), orjson.dumps(event(2)), b'{"id": "e3", "ts": %d, "method": "GET", "path": "/", '
            b'"status": 200, "response_time_ms": 1, "x": %d}' % (clock.now_ms() - 60_000, huge),
            orjson.dumps(event(4))]  # fmt: skip
    records = list(read_records(io.BufferedReader(io.BytesIO(array(raws)))))
    assert [n for n, _ in records[:2]] == [1, 2]
    number, third = records[2]
    assert number == 3
    if backend == "python":
        assert third["x"] == huge and type(third["x"]) is int
    else:
        assert isinstance(third, ValidationError) and len(records) == 3
        assert str(third) == (
            "body: malformed JSON array: parse error: integer overflow (an integer outside the signed 64-bit range)"
        )

    result = ingest(env, tmp_path, array(raws), "--json")
    assert result.exit_code == 3, result.output
    if backend == "python":
        assert orjson.loads(result.stdout) == {"enqueued": 3, "rejected": 1}
        assert rejected_lines(result) == ["line 3: event: not JSON-serialisable: Integer exceeds 64-bit range"]
    else:
        assert orjson.loads(result.stdout) == {"enqueued": 2, "rejected": 1}
        assert rejected_lines(result) == [f"line 3: {third}"]
    assert all(b'"x"' not in m for m in queued(env))


def test_a_malformed_array_keeps_the_elements_before_the_fault(backend: str, env: Env, tmp_path: Path) -> None:
    """Three good elements, then the fault: those three are enqueued, the fault is one
    rejected line numbered as the fourth element (not the whole file, as before)."""
    good = b",".join(orjson.dumps(event(i)) for i in range(3))
    for k, tail in enumerate((b', {"ts": 1, "method"', b", {x}]", b"] trailing", b', {"a": 1.5.5}]'), start=1):
        result = ingest(env, tmp_path, b"[" + good + tail, "--json")
        assert result.exit_code == 3, result.output
        assert orjson.loads(result.stdout) == {"enqueued": 3, "rejected": 1}
        (line,) = rejected_lines(result)
        assert line.startswith("line 4: body: malformed JSON array: "), line
        assert result.stderr == line + "\n" and len(line) < 120, result.stderr  # no parser context lines
        assert env.QUEUE.stats()["pending"] == 3 * k


def test_array_is_parsed_in_bounded_memory(tmp_path: Path) -> None:
    """A ~20 MB array produced on demand by a generator: the reader never holds more than
    a few elements, so the traced peak stays far below the input's size."""
    element = orjson.dumps(event(0, note="x" * 1000))
    count = 20 * 1024 * 1024 // (len(element) + 1) + 1
    produced = [0]

    def chunks() -> Iterator[bytes]:
        yield b"["
        for i in range(count):
            chunk = b"," + element if i else element
            produced[0] += len(chunk)
            yield chunk
        yield b"]"

    stream = io.BufferedReader(GeneratedStream(chunks()))
    tracemalloc.start()
    try:
        n = 0
        for number, value in read_records(stream):
            assert not isinstance(value, ValidationError), value
            n = number
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == count
    assert produced[0] > 20 * 1024 * 1024
    assert peak < 5 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for {produced[0] / 2**20:.1f} MiB of input"


class GeneratedStream(io.RawIOBase):
    """A raw byte stream read from a generator of chunks (nothing else holds the data)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._rest:
                self._rest = next(self._chunks, b"")
                if not self._rest:
                    break
            n = min(len(view) - filled, len(self._rest))
            view[filled : filled + n] = self._rest[:n]
            self._rest = self._rest[n:]
            filled += n
        return filled


# -- one event too large for a message ---------------------------------------------------------


@pytest.mark.parametrize("shape", ["ndjson", "array"])
def test_an_event_too_large_for_a_message_is_rejected_alone(shape: str, env: Env, tmp_path: Path) -> None:
    """Line 7 is a valid event of 200 KB among 10 valid ones, line 9 an invalid one: the
    10 are enqueued (one message each), and both lines are reported in line order."""
    raws = [orjson.dumps(event(i)) for i in range(1, 12)]
    raws[6] = orjson.dumps(event(7, note="x" * 200_000))
    raws.insert(8, orjson.dumps(event(99, status=999)))
    result = ingest(env, tmp_path, ndjson(raws) if shape == "ndjson" else array(raws), "--json")
    assert result.exit_code == 3, result.output
    assert orjson.loads(result.stdout) == {"enqueued": 10, "rejected": 2}
    lines = rejected_lines(result)
    assert lines[0] == f"line 7: {TOO_LARGE}"
    assert lines[1].startswith("line 9: status: ")
    ids = [orjson.loads(m)["id"] for m in queued(env)]
    assert ids == [f"e{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9, 10, 11)]


def test_the_limit_applies_to_the_encoded_message_not_the_line(env: Env, tmp_path: Path) -> None:
    """What counts is the body as the queue encodes it: a line under the limit whose numbers
    re-encode longer (1e15 → 1000000000000000.0) is too large; a line over the limit that is
    mostly whitespace fits."""
    ts = clock.now_ms() - 60_000
    head = b'{"id": "%s", "ts": %d, "method": "GET", "path": "/", "status": 200, "response_time_ms": 1'
    grows = head % (b"grows", ts) + b', "n": [' + b",".join([b"1e15"] * 10_000) + b"]}"
    shrinks = head % (b"shrinks", ts) + b"," + b" " * 200_000 + b'"n": 1}'
    assert len(grows) < MAX_MESSAGE_BYTES < len(orjson.dumps(orjson.loads(grows)))
    assert len(orjson.dumps(orjson.loads(shrinks))) < MAX_MESSAGE_BYTES < len(shrinks)
    result = ingest(env, tmp_path, ndjson([orjson.dumps(event(1)), grows, shrinks, orjson.dumps(event(4))]), "--json")
    assert result.exit_code == 3, result.output
    assert orjson.loads(result.stdout) == {"enqueued": 3, "rejected": 1}
    assert rejected_lines(result) == [f"line 2: {TOO_LARGE}"]
    assert [orjson.loads(m)["id"] for m in queued(env)] == ["e1", "shrinks", "e4"]


# -- a queue that fails part-way ---------------------------------------------------------------


def fail_send(monkeypatch: pytest.MonkeyPatch, on_call: int) -> list[int]:
    """Fault injector: the real queue's `send_batch` raises BindingError on its `on_call`-th
    call (and goes on working after it); returns the sizes of the calls made."""
    real = SqlQueue.send_batch
    sizes: list[int] = []

    def send_batch(self: SqlQueue, bodies: Any) -> list[str]:
        bodies = list(bodies)
        sizes.append(len(bodies))
        if len(sizes) == on_call:
            raise BindingError("queue unavailable: database or disk is full")
        return real(self, bodies)

    monkeypatch.setattr(SqlQueue, "send_batch", send_batch)
    return sizes


def test_a_failing_queue_says_how_far_the_ingest_got(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,600 lines, line 5 invalid; sends are 1,000 events each and the third one fails:
    2,000 events were enqueued, lines 1-2001, and the exit code is the BindingError's."""
    raws = [orjson.dumps(event(i, status=999 if i == 5 else 200)) for i in range(1, 2601)]
    sizes = fail_send(monkeypatch, on_call=3)
    result = ingest(env, tmp_path, ndjson(raws))
    assert result.exit_code == 4, result.output
    assert sizes == [1000, 1000, 599]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("line 5: status: ")
    assert lines[1:] == ["edgepipe: enqueued 2000 events (lines 1-2001) before the failure: "
                         "queue unavailable: database or disk is full"]  # fmt: skip
    assert result.stdout == ""
    assert env.QUEUE.stats()["pending"] == 2000
    assert orjson.loads(queued(env)[-1])["id"] == "e2001"


@pytest.mark.parametrize("shape", ["ndjson", "array"])
def test_a_failing_queue_with_json(shape: str, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raws = [orjson.dumps(event(i)) for i in range(1, 1501)]
    fail_send(monkeypatch, on_call=2)
    result = ingest(env, tmp_path, ndjson(raws) if shape == "ndjson" else array(raws), "--json")
    assert result.exit_code == 4, result.output
    error = "queue unavailable: database or disk is full"
    assert orjson.loads(result.stdout) == {"enqueued": 1000, "rejected": 0, "last_line": 1000, "error": error}
    assert result.stderr == f"edgepipe: enqueued 1000 events (lines 1-1000) before the failure: {error}\n"
    assert env.QUEUE.stats()["pending"] == 1000


def test_a_queue_failing_at_once_enqueued_nothing(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_send(monkeypatch, on_call=1)
    result = ingest(env, tmp_path, ndjson([orjson.dumps(event(i)) for i in range(3)]), "--json")
    assert result.exit_code == 4, result.output
    out = orjson.loads(result.stdout)
    assert (out["enqueued"], out["rejected"], out["last_line"]) == (0, 0, 0)
    assert result.stderr == f"edgepipe: enqueued 0 events before the failure: {out['error']}\n"
    assert out["error"] == "queue unavailable: database or disk is full"
    assert env.QUEUE.stats()["pending"] == 0
