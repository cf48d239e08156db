"""The CLI starts fast: importing `pipeline.cli` (what `edgepipe --help` does) loads none of
the heavy libraries; the commands import them when they run. Checked on the modules a fresh
interpreter has loaded, not on time."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("sqlalchemy", "alembic", "boto3", "botocore", "fastapi", "pydantic", "uvicorn", "apscheduler", "psycopg")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_importing_the_cli_loads_no_heavy_library() -> None:
    loaded = _loaded_after("import pipeline.cli")
    assert "click" in loaded  # the probe sees what was imported
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_help_of_every_command_loads_no_heavy_library() -> None:
    code = (
        "import contextlib, io\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import main\n"
        "for args in (['--help'], ['queue', '--help'], ['replay', '--help'], ['jobs', 'run', '--help'],"
        " ['bench', 'consume', '--help'], ['serve', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
    )
    loaded = _loaded_after(code)
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
