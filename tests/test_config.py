"""Configuration: where the file comes from, how environments and env vars override it, and
that every mistake stops start-up with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.config import Config
from pipeline.errors import ConfigError

BASE = """
[bindings]
db = "sqlite:///base.db"

[consumer]
max_batch_size = 250

[env.production]
bindings.db = "postgresql+psycopg://edgepipe@db.internal/edgepipe"
consumer = { max_batch_size = 1000, visibility_timeout = 60 }

[env.staging.consumer]
max_retries = 7
"""


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory and no EDGEPIPE_* variables from the outside."""
    import os

    for name in list(os.environ):
        if name.startswith("EDGEPIPE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- where the file comes from ------------------------------------------------------------


def test_defaults_without_any_file(no_env: Path) -> None:
    cfg = config.load(environ={})
    assert cfg.source == "built-in defaults"
    assert cfg.bindings.db == "sqlite:///data/edgepipe.db"
    assert cfg.bindings.queue == "db"
    assert cfg.bindings.archive == "file://data/archive"
    assert (cfg.consumer.max_batch_size, cfg.consumer.max_batch_timeout) == (100, 5.0)
    assert (cfg.consumer.max_retries, cfg.consumer.retry_delay, cfg.consumer.visibility_timeout) == (3, 10.0, 30.0)
    assert cfg.paths.max_paths_per_hour == 10_000


def test_dot_edgepipe_toml_in_working_directory(no_env: Path) -> None:
    write(no_env / "edgepipe.toml", "[consumer]\nmax_batch_size = 42\n")
    cfg = config.load(environ={})
    assert cfg.consumer.max_batch_size == 42
    assert cfg.source == "edgepipe.toml"


def test_env_var_file_beats_working_directory(no_env: Path) -> None:
    write(no_env / "edgepipe.toml", "[consumer]\nmax_batch_size = 42\n")
    other = write(no_env / "other.toml", "[consumer]\nmax_batch_size = 43\n")
    cfg = config.load(environ={"EDGEPIPE_CONFIG": str(other)})
    assert cfg.consumer.max_batch_size == 43


def test_explicit_path_beats_env_var(no_env: Path) -> None:
    write(no_env / "edgepipe.toml", "[consumer]\nmax_batch_size = 42\n")
    other = write(no_env / "other.toml", "[consumer]\nmax_batch_size = 43\n")
    explicit = write(no_env / "explicit.toml", "[consumer]\nmax_batch_size = 44\n")
    cfg = config.load(explicit, environ={"EDGEPIPE_CONFIG": str(other)})
    assert cfg.consumer.max_batch_size == 44
    assert cfg.source == str(explicit)


def test_file_values_merge_over_defaults(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, environ={})
    assert cfg.bindings.db == "sqlite:///base.db"
    assert cfg.bindings.archive == "file://data/archive"  # untouched default
    assert cfg.consumer.max_batch_size == 250
    assert cfg.consumer.max_retries == 3


# -- named environments ------------------------------------------------------------------


def test_named_environment_overrides_base(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, env="production", environ={})
    assert cfg.bindings.db == "postgresql+psycopg://edgepipe@db.internal/edgepipe"
    assert cfg.consumer.max_batch_size == 1000
    assert cfg.consumer.visibility_timeout == 60
    assert cfg.consumer.max_retries == 3  # deep merge keeps the rest
    assert cfg.source.endswith("[env.production]")


def test_environment_from_env_var(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, environ={"EDGEPIPE_ENV": "staging"})
    assert cfg.consumer.max_retries == 7
    assert cfg.consumer.max_batch_size == 250
    assert cfg.bindings.db == "sqlite:///base.db"


def test_explicit_environment_beats_env_var(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, env="production", environ={"EDGEPIPE_ENV": "staging"})
    assert cfg.consumer.max_batch_size == 1000
    assert cfg.consumer.max_retries == 3


def test_no_environment_ignores_env_tables(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, environ={})
    assert cfg.consumer.max_batch_size == 250
    assert "env" not in cfg.model_dump()


def test_unknown_environment_names_it_and_the_known_ones(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    with pytest.raises(ConfigError) as err:
        config.load(path, env="prod", environ={})
    message = str(err.value)
    assert "'prod'" in message and "production" in message and "staging" in message
    assert "\n" not in message


def test_unknown_environment_without_any_env_tables(no_env: Path) -> None:
    with pytest.raises(ConfigError, match="unknown environment 'production'"):
        config.load(environ={"EDGEPIPE_ENV": "production"})


# -- EDGEPIPE_<SECTION>__<KEY> ------------------------------------------------------------


def test_env_var_overrides_parse_ints_floats_and_strings(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(
        path,
        env="production",
        environ={
            "EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "17",
            "EDGEPIPE_CONSUMER__RETRY_DELAY": "2.5",
            "EDGEPIPE_BINDINGS__DB": "sqlite:////tmp/override.db",
            "EDGEPIPE_PATHS__STRIP_QUERY": "false",
            "EDGEPIPE_PATHS__ID_PLACEHOLDER": "{id}",
        },
    )
    assert cfg.consumer.max_batch_size == 17 and isinstance(cfg.consumer.max_batch_size, int)
    assert cfg.consumer.retry_delay == 2.5
    assert cfg.consumer.visibility_timeout == 60  # from the environment, not overridden
    assert cfg.bindings.db == "sqlite:////tmp/override.db"
    assert cfg.paths.strip_query is False
    assert cfg.paths.id_placeholder == "{id}"


def test_env_var_override_beats_file_without_environment(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    cfg = config.load(path, environ={"EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "5"})
    assert cfg.consumer.max_batch_size == 5


def test_unrelated_env_vars_are_ignored(no_env: Path) -> None:
    cfg = config.load(environ={"EDGEPIPE_SOMETHING": "x", "OTHER__THING": "1", "EDGEPIPE_CONFIG_X": "y"})
    assert cfg == Config()


def test_env_var_reads_from_process_environment(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CONSUMER__MAX_RETRIES", "9")
    assert config.load().consumer.max_retries == 9


# -- one clear line naming the key ------------------------------------------------------


def one_line_error(path: Path | None = None, environ: dict[str, str] | None = None, env: str | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(path, env=env, environ=environ or {})
    message = str(err.value)
    assert "\n" not in message, message
    assert err.value.exit_code == 2
    return message


def test_unknown_key(no_env: Path) -> None:
    path = write(no_env / "c.toml", "[consumer]\nmax_batch_sise = 10\n")
    message = one_line_error(path)
    assert "unknown key 'consumer.max_batch_sise'" in message


def test_unknown_section(no_env: Path) -> None:
    path = write(no_env / "c.toml", "[consumers]\nmax_batch_size = 10\n")
    assert "unknown key 'consumers'" in one_line_error(path)


def test_unknown_key_from_env_var(no_env: Path) -> None:
    message = one_line_error(environ={"EDGEPIPE_CONSUMER__BATCH": "10"})
    assert "consumer.batch" in message


def test_unknown_key_inside_environment(no_env: Path) -> None:
    path = write(no_env / "c.toml", "[env.production.bindings]\ndatabase = 'sqlite:///x.db'\n")
    message = one_line_error(path, env="production")
    assert "bindings.database" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("db", "mysql://root@localhost/edgepipe"),
        ("db", "data/edgepipe.db"),
        ("queue", "amqp://queue"),
        ("queue", "redis://127.0.0.1:6379/0"),  # a Redis queue names its stream
        ("queue", "kafka://broker:9092/events"),
        ("kv", "memcached://localhost"),
        ("archive", "gs://bucket/prefix"),
        ("archive", "ftp://host/dir"),
    ],
)
def test_bad_binding_url_names_the_key(no_env: Path, key: str, value: str) -> None:
    path = write(no_env / "c.toml", f'[bindings]\n{key} = "{value}"\n')
    message = one_line_error(path)
    assert f"bindings.{key}" in message
    assert value in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("db", "postgresql+psycopg://u@h/d"),
        ("db", "postgresql://u@h/d"),
        ("db", "sqlite:///x.db"),
        ("queue", "db"),
        ("kv", "db"),
        ("archive", "s3://bucket/prefix?endpoint_url=http://minio:9000"),
    ],
)
def test_good_binding_urls_are_accepted(no_env: Path, key: str, value: str) -> None:
    path = write(no_env / "c.toml", f'[bindings]\n{key} = "{value}"\n')
    assert getattr(config.load(path, environ={}).bindings, key) == value


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("consumer", "max_batch_size", "20000"),
        ("consumer", "max_batch_size", "0"),
        ("consumer", "max_batch_timeout", "-1"),
        ("consumer", "max_retries", "-1"),
        ("consumer", "visibility_timeout", "0"),
        ("paths", "max_paths_per_hour", "0"),
        ("http", "port", "70000"),
    ],
)
def test_out_of_range_number_names_the_key(no_env: Path, section: str, key: str, value: str) -> None:
    path = write(no_env / "c.toml", f"[{section}]\n{key} = {value}\n")
    message = one_line_error(path)
    assert f"{section}.{key}" in message
    assert value in message


def test_out_of_range_from_env_var(no_env: Path) -> None:
    message = one_line_error(environ={"EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "20000"})
    assert "consumer.max_batch_size" in message and "20000" in message


def test_wrong_type_names_the_key(no_env: Path) -> None:
    message = one_line_error(environ={"EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "lots"})
    assert "consumer.max_batch_size" in message


def test_invalid_toml(no_env: Path) -> None:
    path = write(no_env / "c.toml", "[consumer\nmax_batch_size = \n")
    message = one_line_error(path)
    assert "invalid TOML" in message and str(path) in message


def test_missing_file(no_env: Path) -> None:
    message = one_line_error(no_env / "nope.toml")
    assert "file not found" in message and "nope.toml" in message


def test_missing_file_from_env_var(no_env: Path) -> None:
    message = one_line_error(environ={"EDGEPIPE_CONFIG": str(no_env / "gone.toml")})
    assert "gone.toml" in message


def test_replace_revalidates() -> None:
    cfg = Config().replace(consumer={"max_batch_size": 7})
    assert cfg.consumer.max_batch_size == 7
    assert cfg.consumer.max_retries == 3
    with pytest.raises(ConfigError, match=r"consumer\.max_batch_size"):
        Config().replace(consumer={"max_batch_size": 20_000})


# -- the CLI: exit code 2 and one line on stderr ------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[consumer]\nmax_batch_sise = 1\n", "consumer.max_batch_sise"),
        ("[consumer]\nmax_batch_size = 20000\n", "consumer.max_batch_size"),
        ('[bindings]\ndb = "mysql://x/y"\n', "bindings.db"),
        ("[consumer\n", "invalid TOML"),
    ],
)
def test_cli_exits_2_with_one_stderr_line(no_env: Path, toml: str, needle: str) -> None:
    path = write(no_env / "bad.toml", toml)
    result = CliRunner().invoke(main, ["--config", str(path), "queue", "stats"], env={"EDGEPIPE_ENV": None})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert result.stdout == ""


def test_cli_missing_config_file(no_env: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(no_env / "missing.toml"), "init"])
    assert result.exit_code == 2
    assert "missing.toml" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (no_env / "data").exists()  # nothing was created


def test_cli_unknown_environment(no_env: Path) -> None:
    path = write(no_env / "c.toml", BASE)
    result = CliRunner().invoke(main, ["--config", str(path), "--env", "nope", "queue", "stats"])
    assert result.exit_code == 2
    assert "unknown environment 'nope'" in result.stderr


def test_cli_bad_env_var_override(no_env: Path) -> None:
    result = CliRunner().invoke(main, ["queue", "stats"], env={"EDGEPIPE_CONSUMER__MAX_BATCH_SIZE": "20000"})
    assert result.exit_code == 2
    assert "consumer.max_batch_size" in result.stderr
