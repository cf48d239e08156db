"""Guard rails an operator meets at the command line: configuration that validates but could
not run fails at start-up (exit 2, one line); an unexpected error is one line, never a
traceback, unless `--debug`. Through the real CLI, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import queries
from tests.test_cli_core import Cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    made = Cli(tmp_path)
    assert made("init").exit_code == 0
    return made


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("EDGEPIPE_BINDINGS__DB", "sqlite://relative.db", "bindings.db"),
        ("EDGEPIPE_BINDINGS__DB", "postgresql+psycopg://h:notaport/db", "bindings.db"),
        ("EDGEPIPE_BINDINGS__ARCHIVE", "s3://bucket/p?endpoint_url=notaurl", "bindings.archive"),
    ],
)
def test_binding_urls_that_cannot_work_exit_2_in_one_line(cli: Cli, key: str, value: str, named: str) -> None:
    cli.environ[key] = value
    result = cli("queue", "stats")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert named in line and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [('pattern = "("\nreplacement = "/x"', "not a valid regular expression"),
     ('pattern = "/a/(\\\\d+)"\nreplacement = "/a/\\\\5"', "invalid group reference")],
)  # fmt: skip
def test_path_rules_that_cannot_run_exit_2(cli: Cli, rule: str, complaint: str) -> None:
    cli.config.write_text(cli.config.read_text() + f"\n[[paths.rules]]\n{rule}\n", encoding="utf-8")
    for command in (("ingest", "-"), ("consume", "--until-empty"), ("paths", "top")):
        result = cli(*command, input=b"")
        assert result.exit_code == 2, (command, result.output)
        (line,) = result.stderr.strip().splitlines()
        assert "paths.rules.0" in line and complaint in line


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("something\nno one expected")

    monkeypatch.setattr(queries, "top_paths", broken)
    result = cli("paths", "top")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == "edgepipe: unexpected error: RuntimeError: something no one expected (--debug shows where)"
    debug = cli("--debug", "paths", "top")
    assert debug.exit_code == 1
    assert isinstance(debug.exception, RuntimeError)  # raised, so the traceback is printed
