"""Backups of the database through the ARCHIVE binding: the `backup` job (01:00) and
`edgepipe backup create|list|verify|restore|prune`.

A backup is two objects under `backups/<id>/` of the store's root (beside the archive's
`events/`), `<id>` being its start time and a random tag (`20261120T010000Z-3f9a`):

* the payload, gzip-compressed (level `COMPRESS_LEVEL`) as it streams from the DB
  binding: `database.sqlite.gz` (the SQLite database file) or `tables.pgcopy.gz` (one
  PostgreSQL COPY text section per table; see `pipeline.bindings.db.backup`);
* `manifest.json`, written last, once the payload was uploaded and read back (`[archive]
  verify`: `full` re-reads the body's sha256, `head` its size): format, payload, source
  dialect, schema revision, rows per table, size and sha256 of the stored bytes, raw
  size, start and finish times. A backup without a manifest (a run that failed or was
  killed) is `incomplete`: never restored, never counted by retention.

Restoring reads the object into a temp file, checks its size and sha256 against the
manifest and only then builds the target database (which must be empty), so a corrupt or
truncated backup is named and refused before anything is written. Retention (`prune`,
also run by the job after each backup) is in `keep`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any, BinaryIO, cast

import orjson

from pipeline import audit, clock, migrate, totals
from pipeline.bindings.archive import CHUNK, ObjectStore
from pipeline.bindings.db import Database
from pipeline.env import Env
from pipeline.errors import IntegrityError, NotFound, ValidationError
from pipeline.jobs import job

log = logging.getLogger("edgepipe.backup")
PREFIX = "backups/"
MANIFEST_NAME = "manifest.json"
FORMAT = "edgepipe-backup/1"
OBJECT_NAMES = {"sqlite": "database.sqlite.gz", "pgcopy": "tables.pgcopy.gz"}
COMPRESS_LEVEL = 1  # level 6 took twice the CPU for ~12% less; the backup shares the machine with the consumer
INCOMPLETE_MAX_AGE_S = 86_400.0  # an incomplete backup older than this was left by a failed run
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{4}$")
Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all when known)


def new_id(at_s: float) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at_s))}-{secrets.token_hex(2)}"


def id_time(backup_id: str) -> float:
    """Epoch seconds of a backup's start, from its id."""
    match = ID_RE.match(backup_id)
    if match is None:
        raise ValidationError("ID", f"{backup_id!r} is not a backup id (like 20261120T010000Z-3f9a)")
    return datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


def manifest_key(backup_id: str) -> str:
    return f"{PREFIX}{backup_id}/{MANIFEST_NAME}"


class _Compressing:
    """A readable file object over `chunks`, gzip-compressed as it is read: counts and
    hashes the compressed bytes (what is stored) and counts the raw ones."""

    def __init__(self, chunks: Iterator[bytes], progress: Progress | None, total: int | None) -> None:
        self._chunks, self._progress, self._total = chunks, progress, total
        self._zip = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)
        self._buf = bytearray()
        self._done = False
        self.sha, self.size, self.raw = hashlib.sha256(), 0, 0

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            chunk = next(self._chunks, None)
            if chunk is None:
                self._buf += self._zip.flush()
                self._done = True
            else:
                self.raw += len(chunk)
                self._buf += self._zip.compress(chunk)
                if self._progress is not None:
                    self._progress(self.raw, self._total)
        out = bytes(self._buf[: len(self._buf) if n < 0 else n])
        del self._buf[: len(out)]
        self.sha.update(out)
        self.size += len(out)
        return out


def create(
    env: Env,
    scheduled_for: datetime | None = None,
    progress: Progress | None = None,
    on_snapshot: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Back up the database now; returns the manifest. The payload is uploaded and checked
    in the store, then the manifest is written: until then the backup is `incomplete`.

    The payload's work runs in a thread of its own at the lowest CPU priority (Linux
    schedules threads as tasks; the thread ends with the upload, so the caller keeps its
    priority): compressing is most of a backup's CPU time, and beside a consumer in the
    same process (the scheduler's thread of `edgepipe worker`) it then takes the time the
    consumer does not want rather than a share of the consumer's (docs/benchmarks.md)."""
    started, began = clock.now_s(), clock.monotonic()
    backup_id = new_id(started)
    with ThreadPoolExecutor(1, thread_name_prefix="edgepipe-backup", initializer=_lowest_priority) as pool:
        stored = pool.submit(_upload, env, backup_id, progress, on_snapshot).result()
    manifest = {
        "format": FORMAT, "id": backup_id, **stored, "dialect": env.DB.dialect, "rows": sum(stored["tables"].values()),
        "compression": "gzip", "started_at": clock.iso(started), "finished_at": clock.iso(clock.now_s()),
        "seconds": round(clock.monotonic() - began, 3),
        "scheduled_for": None if scheduled_for is None else clock.iso(scheduled_for.timestamp()),
    }  # fmt: skip
    env.require_archive().put_bytes(manifest_key(backup_id), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    log.info("backup_created %s", " ".join(f"{k}={manifest[k]}" for k in ("id", "rows", "size", "seconds")))
    return manifest


def _lowest_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _upload(
    env: Env, backup_id: str, progress: Progress | None, on_snapshot: Callable[[], None] | None
) -> dict[str, Any]:
    """Dump, compress and upload the payload, then read it back: its manifest fields."""
    store = env.require_archive()
    with env.DB.dump(on_snapshot) as dump:
        key = f"{PREFIX}{backup_id}/{OBJECT_NAMES[dump.payload]}"
        body = _Compressing(dump.chunks, progress, dump.size)
        try:
            store.put(key, cast(BinaryIO, body), {"backup-id": backup_id, "payload": dump.payload})
        except BaseException:
            with contextlib.suppress(Exception):
                store.delete(key)
            raise
        tables = dict(dump.tables)
    size, sha256 = body.size, body.sha.hexdigest()
    stored = store.digest(key) if env.config.archive.verify == "full" else (store.head(key).size, sha256)
    if stored != (size, sha256):
        store.delete(key)
        raise IntegrityError(f"backup {backup_id}: {key} did not read back as written ({stored[0]:,} bytes)")
    return {"key": key, "payload": dump.payload, "schema": dump.schema, "tables": tables, "size": size,
            "sha256": sha256, "raw_bytes": body.raw}  # fmt: skip


@dataclass
class Entry:
    """A backup found in the store: `manifest` is None while incomplete; `error` says
    why a manifest present could not be read."""

    id: str
    started_s: float
    keys: list[str]
    size: int
    manifest: dict[str, Any] | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "complete" if self.manifest else "unreadable" if self.error else "incomplete"

    def describe(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {
            "id": self.id, "status": self.status, "started_at": clock.iso(self.started_s),
            "finished_at": m.get("finished_at"), "payload": m.get("payload"), "dialect": m.get("dialect"),
            "schema": m.get("schema"), "rows": m.get("rows"), "tables": m.get("tables"),
            "size": m.get("size", self.size), "sha256": m.get("sha256"), "key": m.get("key"), "error": self.error,
        }  # fmt: skip


def entries(store: ObjectStore) -> list[Entry]:
    """Every backup under `backups/`, oldest first; keys that are not a backup's are ignored."""
    found: dict[str, Entry] = {}
    for info in store.list(PREFIX):
        backup_id, _, name = info.key[len(PREFIX) :].partition("/")
        if not ID_RE.match(backup_id) or not name or "/" in name:
            continue
        entry = found.setdefault(backup_id, Entry(backup_id, id_time(backup_id), [], 0))
        entry.keys.append(info.key)
        entry.size += info.size
    for entry in found.values():
        if manifest_key(entry.id) in entry.keys:
            try:
                entry.manifest = _read_manifest(store, entry.id)
            except (IntegrityError, NotFound) as exc:
                entry.error = str(exc)
    return [found[k] for k in sorted(found)]


def _read_manifest(store: ObjectStore, backup_id: str) -> dict[str, Any]:
    try:
        manifest = orjson.loads(store.get_bytes(manifest_key(backup_id)))
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"backup {backup_id}: its manifest is not valid JSON: {exc}") from None
    required = {"format", "id", "key", "payload", "schema", "tables", "size", "sha256"}
    if not isinstance(manifest, dict) or not required <= set(manifest) or manifest["format"] != FORMAT:
        raise IntegrityError(f"backup {backup_id}: its manifest is not an {FORMAT} manifest")
    if manifest["id"] != backup_id or not str(manifest["key"]).startswith(f"{PREFIX}{backup_id}/"):
        raise IntegrityError(f"backup {backup_id}: its manifest names another backup's objects")
    return cast(dict[str, Any], manifest)


def find(store: ObjectStore, backup_id: str | None) -> Entry:
    """The backup `backup_id`, or the newest complete one when None; NotFound otherwise."""
    if backup_id is not None:
        id_time(backup_id)  # a ValidationError for a malformed id
    all_entries = entries(store)
    if backup_id is None:
        complete = [e for e in all_entries if e.manifest]
        if not complete:
            raise NotFound(f"no complete backup under {PREFIX}")
        return complete[-1]
    for entry in all_entries:
        if entry.id == backup_id:
            return entry
    raise NotFound(f"backup {backup_id} not found under {PREFIX}")


def _complete(entry: Entry) -> dict[str, Any]:
    if entry.manifest is None:
        raise IntegrityError(entry.error or f"backup {entry.id}: incomplete: it has no manifest")
    return entry.manifest


@contextlib.contextmanager
def _download(store: ObjectStore, manifest: dict[str, Any], progress: Progress | None) -> Iterator[IO[bytes]]:
    """The stored payload in a temp file, its size and sha256 checked against the manifest."""
    name, key, expected = f"backup {manifest['id']}", manifest["key"], int(manifest["size"])
    sha, size = hashlib.sha256(), 0
    with tempfile.TemporaryFile() as f:
        try:
            for chunk in store.get(key):
                sha.update(chunk)
                size += len(chunk)
                f.write(chunk)
                if progress is not None:
                    progress(size, expected)
        except NotFound:
            raise IntegrityError(f"{name}: its payload {key} is missing") from None
        if size != expected:
            state = "truncated" if size < expected else "longer than written"
            raise IntegrityError(f"{name}: {key} is {state}: {size:,} bytes, the manifest says {expected:,}")
        if sha.hexdigest() != manifest["sha256"]:
            raise IntegrityError(f"{name}: {key} is corrupt: its sha256 does not match the manifest")
        f.seek(0)
        yield f


def _gunzip(f: IO[bytes], name: str) -> Iterator[bytes]:
    unzip = zlib.decompressobj(31)
    try:
        while chunk := f.read(CHUNK):
            if out := unzip.decompress(chunk):
                yield out
    except zlib.error as exc:
        raise IntegrityError(f"{name}: not a valid gzip stream: {exc}") from None
    if not unzip.eof or unzip.unused_data:
        raise IntegrityError(f"{name}: the gzip stream is {'cut short' if not unzip.eof else 'followed by junk'}")


def _check_target(target: Database, manifest: dict[str, Any]) -> None:
    """ValidationError unless `target` can take the backup: no rows, no other schema, and a
    backup schema this edgepipe knows."""
    schema = str(manifest["schema"])
    if not schema.isdigit() or int(schema) > int(migrate.HEAD_REVISION):
        raise ValidationError("ID", f"backup {manifest['id']} has schema {schema}, newer than this edgepipe's "
                              f"({migrate.HEAD_REVISION}): restore it with a newer edgepipe")  # fmt: skip
    busy = target.occupied_tables()
    if busy:
        raise ValidationError("--into", f"the target database is not empty ({', '.join(busy)} hold rows): "
                              "a backup is restored into an empty database")  # fmt: skip
    current = migrate.current_revision(target)
    if current not in (None, schema):
        raise ValidationError("--into", f"the target database is at schema {current}, the backup at {schema}")


def _load(target: Database, manifest: dict[str, Any], body: IO[bytes]) -> dict[str, int]:
    """Build the checked `target` from a checked payload: its schema at the backup's
    revision, the rows, then the schema upgraded to this edgepipe's."""
    migrate.upgrade(target, str(manifest["schema"]))
    rows = target.restore_dump(manifest["payload"], _gunzip(body, f"backup {manifest['id']}"), manifest["tables"])
    migrate.upgrade(target)
    return rows


def restore(
    store: ObjectStore, backup_id: str | None, target: Database, actor: audit.Actor, progress: Progress | None = None
) -> dict[str, Any]:
    """Build `target` (empty) from a backup (the newest complete one when `backup_id` is
    None) and audit it there: `backup.restore` is the first row of the new database's
    audit log. A failed restore leaves the target without rows, ready for another try."""
    manifest = _complete(find(store, backup_id))
    _check_target(target, manifest)
    began = clock.monotonic()
    with _download(store, manifest, progress) as body:
        tables = _load(target, manifest, body)
    result = {
        "id": manifest["id"], "schema": manifest["schema"], "restored_schema": migrate.current_revision(target),
        "tables": tables, "rows": sum(tables.values()), "seconds": round(clock.monotonic() - began, 3),
    }  # fmt: skip
    params = {"id": manifest["id"], "started_at": manifest["started_at"], "dialect": manifest.get("dialect")}
    with audit.action(target, actor, "backup.restore", params) as recorded:
        recorded.update(rows=result["rows"])
    return result


def verify(store: ObjectStore, backup_id: str | None, progress: Progress | None = None) -> dict[str, Any]:
    """Re-read a backup (size, sha256), restore it into a scratch SQLite database and check
    the rows per table against the manifest and `edgepipe verify`'s invariants there
    (`totals_ok`). `ok` is false, with `error` naming what failed, for a backup that is
    incomplete, truncated, corrupt or does not restore."""
    entry = find(store, backup_id)
    out: dict[str, Any] = {"id": entry.id, "ok": False, "error": None, "totals_ok": None}
    out |= {k: (entry.manifest or {}).get(k) for k in ("key", "size", "sha256", "rows")}
    began = clock.monotonic()
    try:
        manifest = _complete(entry)
        with _download(store, manifest, progress) as body, tempfile.TemporaryDirectory(prefix="edgepipe-") as tmp:
            scratch = Database(f"sqlite:///{tmp}/scratch.db")
            try:
                _check_target(scratch, manifest)
                _load(scratch, manifest, body)
                out["totals_ok"] = totals.verify(scratch)["ok"]
            finally:
                scratch.dispose()
        out["ok"] = True
    except IntegrityError as exc:
        out["error"] = str(exc)
    out["seconds"] = round(clock.monotonic() - began, 3)
    return out


# -- retention ----------------------------------------------------------------------------


def keep(entries_: list[Entry], now_s: float, keep_daily: int, keep_weekly: int) -> dict[str, list[str]]:
    """The complete backups retention keeps, with why (id → reasons). At `now_s` (UTC):
    `daily YYYY-MM-DD`: the newest backup started on that day, for each of the
    `keep_daily` calendar days ending today; `weekly YYYY-Www`: the newest one started in
    that ISO week, for each of the `keep_weekly` ISO weeks ending with this one; `newest`:
    the newest complete backup, always (retention never leaves none); `future`: one
    started after `now_s` (a clock set back), never judged."""
    today = datetime.fromtimestamp(now_s, UTC).date()
    days = {today - timedelta(days=k) for k in range(keep_daily)}
    monday = today - timedelta(days=today.weekday())
    weeks = {_week(monday - timedelta(weeks=k)) for k in range(keep_weekly)}
    newest: dict[str, Entry] = {}
    reasons: dict[str, list[str]] = {}
    judged = [e for e in entries_ if e.manifest and e.started_s <= now_s]  # oldest first: the last of a period wins
    for entry in judged:
        day = datetime.fromtimestamp(entry.started_s, UTC).date()
        if day in days:
            newest[f"daily {day.isoformat()}"] = entry
        if _week(day) in weeks:
            newest[f"weekly {_week(day)}"] = entry
    if judged:
        newest["newest"] = judged[-1]
    for entry in entries_:
        if entry.manifest and entry.started_s > now_s:
            reasons[entry.id] = ["future"]
    for reason, entry in sorted(newest.items(), key=lambda item: ("dwn".index(item[0][0]), item[0])):
        reasons.setdefault(entry.id, []).append(reason)
    return reasons


def _week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def prune(store: ObjectStore, now_s: float, keep_daily: int, keep_weekly: int, dry_run: bool = False) -> dict[str, Any]:
    """Delete the complete backups `keep` does not keep, and incomplete ones started more
    than `INCOMPLETE_MAX_AGE_S` ago (a run in progress is younger); an unreadable manifest
    is kept for a person to look at. A backup's manifest goes first, so one cut short by a
    failure is incomplete, never complete with a payload missing."""
    found = entries(store)
    kept = keep(found, now_s, keep_daily, keep_weekly)
    deleted = [e for e in found if e.manifest and e.id not in kept]
    stale = [e for e in found if e.status == "incomplete" and e.started_s < now_s - INCOMPLETE_MAX_AGE_S]
    if not dry_run:
        for entry in deleted + stale:
            for key in sorted(entry.keys, key=lambda k: not k.endswith("/" + MANIFEST_NAME)):
                store.delete(key)
    return {
        "dry_run": dry_run, "at": clock.iso(now_s), "keep_daily": keep_daily, "keep_weekly": keep_weekly,
        "kept": [{"id": k, "reasons": v} for k, v in sorted(kept.items())],
        "deleted": [e.id for e in deleted], "incomplete_deleted": [e.id for e in stale],
        "unreadable": [e.id for e in found if e.status == "unreadable"],
    }  # fmt: skip


@job("backup")
def run(env: Env, scheduled_for: datetime, dry_run: bool = False) -> dict[str, Any]:
    """Back up the database, then apply retention (`[backup] keep_daily`, `keep_weekly`)."""
    cfg, store = env.config.backup, env.require_archive()
    result: dict[str, Any] = {"dry_run": dry_run, "id": None}
    if not dry_run:
        made = create(env, scheduled_for)
        result |= {k: made[k] for k in ("id", "key", "rows", "size", "raw_bytes", "seconds")}
    pruned = prune(store, clock.now_s(), cfg.keep_daily, cfg.keep_weekly, dry_run)
    result |= {"kept": len(pruned["kept"])} | {k: pruned[k] for k in ("deleted", "incomplete_deleted")}
    log.info("backup_run %s", " ".join(f"{k}={v}" for k, v in result.items()))
    return result
