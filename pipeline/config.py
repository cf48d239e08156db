"""Configuration: one TOML file, named environments, env-var overrides, strict validation.

Resolution order for the file: `--config PATH`, else `$EDGEPIPE_CONFIG`, else
`./edgepipe.toml`, else the built-in embedded defaults (everything under `./data/`).
A named environment (`[env.NAME]`, chosen by `--env` or `$EDGEPIPE_ENV`) is deep-merged
over the base, like wrangler environments. Finally every key can be overridden with
`EDGEPIPE_<SECTION>__<KEY>` (values are read as TOML scalars when they parse, else as
strings). Validation happens once, at start-up: an unknown key, a bad URL or an
out-of-range number raises `ConfigError` whose one-line message names the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.cron import parse_table
from pipeline.errors import ConfigError, ValidationError

ENV_PREFIX = "EDGEPIPE_"
DEFAULT_FILE = "edgepipe.toml"
DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
QUEUE_SCHEMES = ("db", "sqs", "redis")  # db: tables in the DB binding's database
KV_SCHEMES = ("db", "redis")
ARCHIVE_SCHEMES = ("file", "s3")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    scheme = urlsplit(value).scheme if "://" in value else value.split(":", 1)[0]
    if scheme not in schemes:
        raise ValueError(f"unsupported URL {value!r}: scheme must be one of {', '.join(schemes)}")
    return value


class Bindings(Section):
    """URLs of the four bindings. `db` for queue/kv means "tables in the DB binding";
    the queue may also be `sqs://QUEUE_NAME?region=…&endpoint_url=…` or
    `redis://HOST:PORT/DB?stream=NAME`, the KV `redis://HOST:PORT/DB?prefix=…`."""

    db: str = "sqlite:///data/edgepipe.db"
    queue: str = "db"
    kv: str = "db"
    archive: str = "file://data/archive"

    @field_validator("db")
    @classmethod
    def _db(cls, v: str) -> str:
        _check_url(v, DB_SCHEMES)
        parts = urlsplit(v)
        if parts.scheme == "sqlite" and parts.netloc:
            raise ValueError(f"{v!r}: a SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db")
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"{v!r}: {exc}") from None
        return v

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        _check_url(v, QUEUE_SCHEMES)
        parts = urlsplit(v)
        if parts.scheme == "sqs" and not parts.netloc:
            raise ValueError(f"{v!r}: an SQS URL names its queue: sqs://QUEUE_NAME?region=…&endpoint_url=…")
        if parts.scheme == "redis" and not parse_qs(parts.query).get("stream"):
            raise ValueError(f"{v!r}: a Redis queue URL names its stream: redis://HOST:PORT/DB?stream=NAME")
        return v

    @field_validator("kv")
    @classmethod
    def _kv(cls, v: str) -> str:
        return _check_url(v, KV_SCHEMES)

    @field_validator("archive")
    @classmethod
    def _archive(cls, v: str) -> str:
        return _check_url(v, ARCHIVE_SCHEMES)


class Consumer(Section):
    max_batch_size: int = Field(100, ge=1, le=10_000)
    max_batch_timeout: float = Field(5.0, ge=0, le=60)
    max_retries: int = Field(3, ge=0, le=100)
    retry_delay: float = Field(10.0, ge=0, le=43_200)
    visibility_timeout: float = Field(30.0, ge=1, le=43_200)
    snapshot_every_batches: int = Field(10, ge=0, le=1_000_000)
    # After a transient fault (a lock, a full disk, a dropped connection) the worker waits
    # backoff_initial_s, doubling per failure up to backoff_max_s (jittered), and tries again.
    backoff_initial_s: float = Field(0.5, gt=0, le=60)
    backoff_max_s: float = Field(30.0, gt=0, le=3600)
    dlq_retention_days: float = Field(14, ge=0, le=36_500)  # dead letters older are purged by `clean`; 0 = keep


class PathRule(Section):
    """A regex substitution applied to normalised paths; both halves are compiled here, so
    a rule that cannot run fails at start-up instead of in every batch it matches."""

    pattern: str
    replacement: str

    @model_validator(mode="after")
    def _compiles(self) -> PathRule:
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        try:
            compiled.sub(self.replacement, "")  # the template is compiled even without a match
        except (re.error, IndexError) as exc:
            raise ValueError(f"replacement {self.replacement!r} does not fit pattern {self.pattern!r}: {exc}") from None
        return self


class Paths(Section):
    max_paths_per_hour: int = Field(10_000, ge=1, le=10_000_000)
    max_length: int = Field(2048, ge=16, le=65_536)
    strip_query: bool = True
    collapse_slashes: bool = True
    strip_trailing_slash: bool = True
    replace_ids: bool = True
    id_placeholder: str = ":id"
    rules: list[PathRule] = Field(default_factory=list)


class Retention(Section):
    """How long each tier is kept. 0 means forever for the tiers that may be kept forever."""

    detail_days: int = Field(3, ge=1, le=3650)  # detail rows in the database, then archived and cleaned
    archive_days: int = Field(0, ge=0, le=36_500)  # archive objects in the bucket (the `expire` job)
    hourly_days: int = Field(0, ge=0, le=36_500)  # hourly aggregates of rolled-up days (the `rollup` job)

    @model_validator(mode="after")
    def _tiers(self) -> Retention:
        if self.archive_days and self.archive_days <= self.detail_days:
            raise ValueError(
                f"archive_days ({self.archive_days}) must be 0 (forever) or more than detail_days ({self.detail_days})"
            )
        if self.hourly_days and self.hourly_days < self.detail_days + 2:
            raise ValueError(
                f"hourly_days ({self.hourly_days}) must be 0 (forever) or at least detail_days + 2 "
                f"({self.detail_days + 2}): late events still land in the hours of the last detail_days + 1 days"
            )
        return self


class Archive(Section):
    prefix: str = "events"
    max_rows_per_object: int = Field(100_000, ge=1, le=10_000_000)
    max_objects_per_run: int = Field(1000, ge=1, le=1_000_000)
    verify: Literal["full", "head"] = "full"
    multipart_threshold: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)
    connect_timeout: float = Field(5.0, gt=0, le=600)  # seconds to open a connection to the object store
    read_timeout: float = Field(60.0, gt=0, le=3600)  # seconds of silence on an open connection before giving up
    max_attempts: int = Field(5, ge=1, le=20)  # attempts per object-store operation (each retry is logged)


class Cleaner(Section):
    batch_size: int = Field(1000, ge=1, le=100_000)  # ≈ rows per clean transaction (whole objects)
    max_run_seconds: float = Field(900, gt=0, le=86_400)  # a clean run stops after this; `complete` says so
    reclaim_space: bool = False
    stats_file: str = "data/stats/lifetime_stats.json"


class Snapshots(Section):
    top_n: int = Field(100, ge=1, le=100_000)
    window_hours: int = Field(24, ge=1, le=24 * 366)
    keep: int = Field(5, ge=1, le=10_000)
    min_interval_s: float = Field(1.0, ge=0, le=3600)  # a refresh due sooner after the last one is skipped
    build_in: Literal["process", "thread"] = "process"  # where the worker builds a snapshot (snapshots.builder)


class Schedule(Section):
    timezone: str = "UTC"
    misfire_grace: float = Field(3600, ge=0)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff: float = Field(60, ge=0)
    lease_seconds: float = Field(300, ge=5)
    tick_seconds: float = Field(30, ge=1, le=3600)  # how often a worker re-checks for due or retried runs
    jobs: dict[str, str] = Field(
        default_factory=lambda: {
            "rollup": "15 0 * * *",
            "archive": "0 2 * * *",
            "clean": "0 3 * * *",
            "monitor": "0 4 * * *",
            "snapshot_prune": "0 5 * * sun",
            "expire": "0 6 * * *",
            "backup": "0 1 * * *",
        }
    )

    @model_validator(mode="after")
    def _cron(self) -> Schedule:

        try:
            parse_table(self.jobs, self.timezone)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        return self


class Worker(Section):
    dead_after: float = Field(120, ge=10)  # seconds without a heartbeat before a worker is dead
    forget_after: float = Field(86_400, ge=60)  # seconds after which dead and stopped workers are no longer listed
    metrics_port: int = Field(0, ge=0, le=65535)  # serve Prometheus metrics on this port; 0 = off
    metrics_host: str = "127.0.0.1"  # the address the metrics port binds to


class Monitor(Section):
    capacity_bytes: int = Field(10 * 1000**3, ge=1)
    warn_ratio: float = Field(0.8, gt=0, le=1)  # alert when the database fills this share of capacity
    min_days_left: float = Field(30, ge=0)  # alert when projected days until capacity drop below this
    max_queue_depth: int = Field(100_000, ge=0)
    max_queue_age_s: float = Field(3600, gt=0)  # alert `queue_age` when the oldest message waits longer
    max_dlq_depth: int = Field(1000, ge=0)
    max_dlq_growth: int = Field(100, ge=0)  # alert `dlq` when more letters than this arrived in the last day


class Http(Section):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=1, le=65535)
    max_events_per_request: int = Field(1000, ge=1, le=100_000)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_queue_depth: int = Field(100_000, ge=1)  # messages (a request is one, or a few)
    depth_check_interval: float = Field(1.0, ge=0, le=60)  # seconds a queue-depth reading is reused
    snapshot_max_age: float = Field(900, ge=0)  # seconds; an older KV snapshot is not served
    heartbeat_max_age: float = Field(60, ge=1)  # seconds; /ready fails when no worker was seen since
    ready_timeout: float = Field(5.0, gt=0, le=60)  # seconds per /ready check
    body_timeout: float = Field(30.0, gt=0, le=3600)  # seconds to receive a whole POST /v1/events body (else 408)
    # Per-token request rate (token bucket): `rate_limit_per_s` requests a second on average,
    # bursts of `burst`; over it, 429 with Retry-After. 0 = no limit.
    rate_limit_per_s: float = Field(0, ge=0, le=1_000_000)
    burst: int = Field(100, ge=1, le=1_000_000)
    ssl_certfile: str = ""  # PEM certificate (chain): serve HTTPS
    ssl_keyfile: str = ""  # its private key
    proxy_headers: bool = False  # trust X-Forwarded-For / -Proto from `forwarded_allow_ips`
    forwarded_allow_ips: str = "127.0.0.1"  # comma-separated addresses of trusted proxies ("*": any)


class Audit(Section):
    retention_days: int = Field(365, ge=0, le=36_500)  # audit rows older are deleted by `clean`; 0 = keep


class Backup(Section):
    """Backups of the database through the ARCHIVE binding (`edgepipe backup`, the `backup` job)."""

    keep_daily: int = Field(7, ge=0, le=3650)  # the newest backup of each of the last N days
    keep_weekly: int = Field(4, ge=0, le=520)  # the newest backup of each of the last N ISO weeks


class Config(Section):
    bindings: Bindings = Field(default_factory=Bindings)
    consumer: Consumer = Field(default_factory=Consumer)
    paths: Paths = Field(default_factory=Paths)
    retention: Retention = Field(default_factory=Retention)
    archive: Archive = Field(default_factory=Archive)
    cleaner: Cleaner = Field(default_factory=Cleaner)
    snapshots: Snapshots = Field(default_factory=Snapshots)
    schedule: Schedule = Field(default_factory=Schedule)
    worker: Worker = Field(default_factory=Worker)
    monitor: Monitor = Field(default_factory=Monitor)
    http: Http = Field(default_factory=Http)
    audit: Audit = Field(default_factory=Audit)
    backup: Backup = Field(default_factory=Backup)
    source: str = Field("built-in defaults", exclude=True)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys changed and re-validated, e.g. `replace(consumer={...})`."""
        data = self.model_dump()
        _deep_merge(data, sections)
        return _validate(data, self.source)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _scalar(value)
    return out


def _validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate({**data, "source": source})
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config error ({source}): unknown key {key!r}") from None
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        raise ConfigError(f"config error ({source}): {key}: {msg}{shown}") from None


def load(
    path: str | os.PathLike[str] | None = None,
    env: str | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load, merge and validate the configuration. Raises ConfigError with one clear line."""
    environ = dict(os.environ if environ is None else environ)
    chosen = path or environ.get("EDGEPIPE_CONFIG")
    if chosen is None and Path(DEFAULT_FILE).is_file():
        chosen = DEFAULT_FILE
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if chosen is not None:
        source = str(chosen)
        try:
            data = tomllib.loads(Path(chosen).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config error: file not found: {chosen}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error ({chosen}): invalid TOML: {exc}") from None
    envs = data.pop("env", {})
    name = env or environ.get("EDGEPIPE_ENV")
    if name:
        if name not in envs:
            known = ", ".join(sorted(envs)) or "none defined"
            raise ConfigError(f"config error ({source}): unknown environment {name!r} ({known})")
        _deep_merge(data, envs[name])
        source = f"{source} [env.{name}]"
    overrides = _env_overrides(environ)
    if overrides:
        _deep_merge(data, overrides)
    return _validate(data, source)
