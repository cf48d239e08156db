"""The core commands, in-process with click's CliRunner, on a config file in tmp_path (nothing
touches the working directory): help everywhere, init, ingest, consume, paths, queue, DLQ,
and the one-line errors with their exit codes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner, Result

from pipeline import clock, migrate
from pipeline.bindings.db import Database
from pipeline.cli import main
from pipeline.config import load
from pipeline.env import Env, open_env
from tests.traffic_truth import Truth, expected_aggregates, make_events

HOUR_MS = 3_600_000
ROW_FIELDS = {
    "hour", "host", "path", "method", "requests", "status_2xx", "status_3xx", "status_4xx", "status_5xx",
    "rt_sum_ms", "rt_min_ms", "rt_max_ms", "p50_ms", "p95_ms", "p99_ms",
}  # fmt: skip


class Cli:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "edgepipe.toml"
        self.config.write_text(
            f"""
[bindings]
db = "sqlite:///{tmp / "db" / "edgepipe.db"}"
archive = "file://{tmp / "archive"}"

[consumer]
max_batch_size = 50
max_batch_timeout = 0

[cleaner]
stats_file = "{tmp / "stats" / "lifetime_stats.json"}"
""",
            encoding="utf-8",
        )
        self.environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("EDGEPIPE_")}

    def __call__(self, *args: str, input: bytes | str | None = None) -> Result:
        runner = CliRunner(env=self.environ)
        return runner.invoke(main, ["--config", str(self.config), "--log-level", "ERROR", *args], input=input)

    def json(self, *args: str, code: int = 0) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == code, result.output
        return orjson.loads(result.stdout)

    def env(self) -> Env:
        return open_env(load(self.config, environ={}))


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    yield Cli(tmp_path)


@pytest.fixture
def ready(cli: Cli) -> Cli:
    result = cli("init")
    assert result.exit_code == 0, result.output
    return cli


def ndjson(bodies: list[Any]) -> bytes:
    return b"".join(orjson.dumps(b) + b"\n" for b in bodies)


# -- help ---------------------------------------------------------------------------------


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, (*prefix, name))


def test_every_command_has_help() -> None:
    paths = list(command_paths(main))
    expected = {("init",), ("ingest",), ("consume",), ("worker",), ("db", "upgrade"), ("db", "current"),
                ("queue", "stats"), ("queue", "dlq", "list"), ("queue", "dlq", "redrive"), ("paths", "top"),
                ("paths", "hourly"), ("sample",)}  # fmt: skip
    assert expected <= set(paths)
    runner = CliRunner()
    for path in [(), *paths]:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.stdout, path
        assert result.stdout.count("\n") > 2, path


# -- init, db -----------------------------------------------------------------------------


def test_init_is_idempotent(cli: Cli, tmp_path: Path) -> None:
    for _ in range(2):
        result = cli("init")
        assert result.exit_code == 0, result.output
        assert "initialised" in result.stderr
    assert (tmp_path / "db" / "edgepipe.db").is_file()
    assert (tmp_path / "archive").is_dir()
    assert (tmp_path / "stats").is_dir()
    current = cli("db", "current")
    assert current.stdout.strip() == migrate.head_revision()
    upgrade = cli("db", "upgrade")
    assert upgrade.exit_code == 0 and migrate.head_revision() in upgrade.stderr


def test_uninitialised_database_is_a_one_line_error(cli: Cli) -> None:
    for args in (("queue", "stats"), ("consume", "--until-empty"), ("paths", "top"), ("ingest", "-")):
        result = cli(*args, input=b"")
        assert result.exit_code == 4, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert "not initialised" in lines[0] and "edgepipe init" in lines[0]
    assert cli("db", "current").stdout.strip() == ""


# -- ingest -------------------------------------------------------------------------------


def test_ingest_ndjson_reports_rejected_lines(ready: Cli, tmp_path: Path) -> None:
    now = clock.now_ms()
    good = [{"id": f"g{i}", "ts": now - i, "method": "GET", "path": "/a", "status": 200, "response_time_ms": 1}
            for i in range(5)]  # fmt: skip
    lines = [
        orjson.dumps(good[0]),
        b"{not json",
        orjson.dumps(good[1]),
        b"",
        orjson.dumps(good[2] | {"status": 999}),
        orjson.dumps(good[3]),
        orjson.dumps(good[4] | {"path": "relative"}),
    ]
    source = tmp_path / "events.ndjson"
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = ready("ingest", str(source), "--json")
    assert result.exit_code == 3, result.output
    assert orjson.loads(result.stdout) == {"enqueued": 3, "rejected": 3}
    rejected = result.stderr.strip().splitlines()
    assert rejected[0].startswith("line 2: line: malformed JSON")
    assert rejected[1].startswith("line 5: status: ")
    assert rejected[2].startswith("line 7: path: ")
    assert ready.json("queue", "stats")["pending"] == 3


def test_ingest_json_array_from_stdin(ready: Cli) -> None:
    now = clock.now_ms()
    events = [{"ts": now - i, "method": "POST", "path": "/b", "status": 201, "response_time_ms": 2.5}
              for i in range(4)]  # fmt: skip
    events.insert(2, {"ts": now, "method": "POST", "path": "/b", "status": 201})
    result = ready("ingest", "-", "--json", input=orjson.dumps(events))
    assert result.exit_code == 3
    assert orjson.loads(result.stdout) == {"enqueued": 4, "rejected": 1}
    assert result.stderr.strip() == "line 3: response_time_ms: required"


def test_ingest_all_valid_exits_0(ready: Cli, tmp_path: Path) -> None:
    pairs = make_events(seed=5, n=30, now_ms=clock.now_ms() - 60_000, span_ms=HOUR_MS)
    source = tmp_path / "events.ndjson"
    source.write_bytes(ndjson([b for b, _ in pairs]))
    result = ready("ingest", str(source))
    assert result.exit_code == 0, result.output
    assert "enqueued 30 events, rejected 0" in result.stderr
    assert result.stdout == ""


def test_ingest_malformed_array(ready: Cli) -> None:
    result = ready("ingest", "-", "--json", input=b'[{"a": 1},')
    assert result.exit_code == 3
    assert orjson.loads(result.stdout) == {"enqueued": 0, "rejected": 2}  # element 1 (no ts), then the fault
    assert "malformed JSON array" in result.stderr


# -- consume, paths -----------------------------------------------------------------------


@pytest.fixture
def loaded(ready: Cli, tmp_path: Path) -> tuple[Cli, list[Truth]]:
    pairs = make_events(seed=6, n=400, now_ms=clock.now_ms() - 60_000, span_ms=5 * HOUR_MS)
    source = tmp_path / "events.ndjson"
    source.write_bytes(ndjson([b for b, _ in pairs] + [b for b, _ in pairs[:100]]))  # with duplicates
    assert ready("ingest", str(source)).exit_code == 0
    out = ready.json("consume", "--until-empty")
    assert out["batches"] == 10  # 500 messages, 50 per batch
    assert (out["pending"], out["in_flight"], out["dlq"]) == (0, 0, 0)
    return ready, [t for _, t in pairs]


def test_consume_max_batches(ready: Cli) -> None:
    now = clock.now_ms()
    events = [{"ts": now - i, "method": "GET", "path": "/c", "status": 200, "response_time_ms": 1} for i in range(120)]
    ready("ingest", "-", input=orjson.dumps(events))
    out = ready.json("consume", "--max-batches", "2")
    assert out["batches"] == 2 and out["pending"] == 20
    assert ready.json("consume", "--until-empty")["batches"] == 1


def test_paths_hourly_json_rows(loaded: tuple[Cli, list[Truth]]) -> None:
    cli, truths = loaded
    expected = expected_aggregates(truths)
    rows = cli.json("paths", "hourly")
    assert len(rows) == len(expected)
    for row in rows:
        assert set(row) >= ROW_FIELDS, set(row) ^ ROW_FIELDS
        assert row["hour"].endswith("Z") and row["hour"][13:] == ":00:00Z"
        key = (int(clock.parse_time(row["hour"])), row["host"], row["path"], row["method"])
        want = expected[key]
        for column in ("requests", "status_2xx", "status_3xx", "status_4xx", "status_5xx", "rt_min_ms", "rt_max_ms"):
            assert row[column] == want[column], (key, column)
        assert row["rt_sum_ms"] == pytest.approx(want["rt_sum_ms"])
        assert row["rt_min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["rt_max_ms"]
    assert [r["hour"] for r in rows] == sorted(r["hour"] for r in rows)


def test_paths_hourly_filters(loaded: tuple[Cli, list[Truth]]) -> None:
    cli, _ = loaded
    everything = cli.json("paths", "hourly")
    by_path = cli.json("paths", "hourly", "--path", "/users/:id")
    assert by_path and by_path == [r for r in everything if r["path"] == "/users/:id"]
    by_method = cli.json("paths", "hourly", "--method", "delete")
    assert by_method and by_method == [r for r in everything if r["method"] == "DELETE"]
    by_host = cli.json("paths", "hourly", "--host", "shop.example.com")
    assert by_host and by_host == [r for r in everything if r["host"] == "shop.example.com"]
    hours = sorted({r["hour"] for r in everything})
    assert len(hours) >= 3
    window = cli.json("paths", "hourly", "--from", hours[1], "--to", hours[2])
    assert window and window == [r for r in everything if r["hour"] == hours[1]]
    epoch = cli.json("paths", "hourly", "--from", str(int(clock.parse_time(hours[-1]))))
    assert epoch == [r for r in everything if r["hour"] == hours[-1]]
    assert cli.json("paths", "hourly", "--path", "/nope") == []
    bad = cli("paths", "hourly", "--from", "last week")
    assert bad.exit_code == 3 and bad.stderr.startswith("edgepipe: --from: ")


def test_paths_top_json(loaded: tuple[Cli, list[Truth]]) -> None:
    cli, truths = loaded
    rows = cli.json("paths", "top", "--hours", "24", "--limit", "5")
    assert len(rows) == 5
    totals: dict[tuple[str, str], int] = {}
    for t in truths:
        totals[(t.path, t.method)] = totals.get((t.path, t.method), 0) + 1
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [((r["path"], r["method"]), r["requests"]) for r in rows] == ranked
    for row in rows:
        fields = ROW_FIELDS - {"hour", "host"}
        assert fields <= set(row), fields - set(row)
    assert sum(r["requests"] for r in cli.json("paths", "top", "--limit", "1000")) == len(truths)
    one_hour = cli.json("paths", "top", "--hours", "1", "--limit", "1000")
    assert sum(r["requests"] for r in one_hour) < len(truths)


def test_paths_tables_print(loaded: tuple[Cli, list[Truth]]) -> None:
    cli, _ = loaded
    top = cli("paths", "top", "--limit", "3")
    assert top.exit_code == 0 and "top 3 paths, last 24 h" in top.stdout
    assert top.stdout.count("\n") == 3 + 5  # title, top border, header, rule, 3 rows, bottom border
    assert f"│ {cli.json('paths', 'top', '--limit', '1')[0]['path']} " in top.stdout
    hourly = cli("paths", "hourly", "--path", "/health", "--method", "GET", "--host", "api.example.com")
    rows = len(cli.json("paths", "hourly", "--path", "/health", "--method", "GET", "--host", "api.example.com"))
    assert hourly.exit_code == 0 and "hourly" in hourly.stdout
    assert rows > 0 and hourly.stdout.count("\n") == rows + 5


# -- queue, DLQ ---------------------------------------------------------------------------


def test_queue_stats_dlq_list_and_redrive(ready: Cli) -> None:
    env = ready.env()
    try:
        now = clock.now_ms()
        env.QUEUE.send_batch([
            {"id": "ok", "ts": now, "method": "GET", "path": "/", "status": 200, "response_time_ms": 1},
            {"id": "bad", "ts": now, "method": "GET", "path": "/", "status": 999, "response_time_ms": 1},
        ])  # fmt: skip
    finally:
        env.close()
    assert ready.json("queue", "stats") == {"pending": 2, "in_flight": 0, "dlq": 0}
    ready.json("consume", "--until-empty")
    stats = ready.json("queue", "stats")
    assert {k: stats[k] for k in ("pending", "in_flight", "dlq")} == {"pending": 0, "in_flight": 0, "dlq": 1}
    (dead,) = ready.json("queue", "dlq", "list")
    assert dead["reason"] == "invalid" and dead["error"].startswith("status: ")
    assert orjson.loads(dead["body"])["id"] == "bad"
    text = ready("queue", "dlq", "list")
    assert "invalid" in text.stdout and dead["message_id"] in text.stdout
    plain = ready("queue", "stats")
    assert "pending" in plain.stdout and "dlq" in plain.stdout

    redrive = ready("queue", "dlq", "redrive")
    assert redrive.exit_code == 0 and "redrove 1" in redrive.stderr
    assert ready.json("queue", "stats") == {"pending": 1, "in_flight": 0, "dlq": 0}
    assert ready.json("queue", "dlq", "list") == []


def test_bad_arguments_are_usage_errors(ready: Cli) -> None:
    assert ready("paths", "top", "--hours", "0").exit_code == 2
    assert ready("consume", "--max-batches", "0").exit_code == 2
    assert ready("ingest", "/no/such/file").exit_code == 2
    assert ready("no-such-command").exit_code == 2


def test_init_on_postgres(pg_server_url: str, tmp_path: Path) -> None:
    from tests.support import scratch_db

    with scratch_db(pg_server_url, tmp_path) as url:
        cli = Cli(tmp_path)
        cli.environ["EDGEPIPE_BINDINGS__DB"] = url
        assert cli("init").exit_code == 0
        assert cli("init").exit_code == 0
        assert cli.json("queue", "stats") == {"pending": 0, "in_flight": 0, "dlq": 0}
        db = Database(url)
        try:
            assert migrate.current_revision(db) == migrate.head_revision()
        finally:
            db.dispose()
