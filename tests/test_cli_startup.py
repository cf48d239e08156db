"""The CLI starts fast: importing `pipeline.cli` (what `edgepipe --help` does) loads none of
the heavy libraries; the commands import them when they run. Checked on the modules a fresh
interpreter has loaded, not on time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_jobs_list_in_a_fresh_process(tmp_path: Path) -> None:
    """`jobs list` registers the jobs it checks the cron table against (the test session
    registers them for every test; a fresh `edgepipe` process has only itself)."""
    import orjson

    env = {"EDGEPIPE_BINDINGS__DB": f"sqlite:///{tmp_path / 'e.db'}", "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "pipeline"]
    subprocess.run([*cli, "init"], env=env, capture_output=True, check=True)
    out = subprocess.run([*cli, "jobs", "list", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {"archive", "clean", "monitor", "backup"} <= {row["job"] for row in orjson.loads(out.stdout)}
