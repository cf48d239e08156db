"""`file://DIR`: the embedded object store, a directory tree.

An object is a file at DIR/KEY; its metadata is a JSON sidecar under DIR/.meta/KEY.json.
Both are written to a temp file, fsynced and moved into place with `os.replace`, body
first: a crash leaves either the old object or the new one, never a torn file. A body
without a sidecar (a crash between the two renames) is listed with empty metadata, which
the archiver's checks treat as unverified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from pipeline import clock
from pipeline.bindings.archive import CHUNK, ObjectInfo, ObjectStore
from pipeline.errors import BindingError, NotFound, ValidationError
from pipeline.files import write_atomic

META_DIR = ".meta"
TMP_DIR = ".tmp"


class FileStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BindingError(f"archive directory {self.root}: {exc.strerror}") from None

    @classmethod
    def from_url(cls, url: str) -> FileStore:
        parts = urlsplit(url)
        return cls((parts.netloc or "") + (parts.path or "") or ".")

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if (
            not key
            or key.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] in (META_DIR, TMP_DIR)
        ):
            raise ValidationError("key", f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _meta_path(self, key: str) -> Path:
        return self.root / META_DIR / (key + ".json")

    def _atomic_write(self, target: Path, chunks: Iterator[bytes]) -> int:
        return write_atomic(target, chunks, tmp_dir=self.root / TMP_DIR)

    def put(self, key: str, body: BinaryIO, metadata: dict[str, str] | None = None) -> ObjectInfo:
        path = self._path(key)
        meta = {str(k).lower(): str(v) for k, v in (metadata or {}).items()}

        def chunks() -> Iterator[bytes]:
            while chunk := body.read(CHUNK):
                yield chunk

        try:
            self._meta_path(key).unlink(missing_ok=True)  # never pair a new body with old metadata
            size = self._atomic_write(path, chunks())
            self._atomic_write(self._meta_path(key), iter([json.dumps(meta, sort_keys=True).encode()]))
        except OSError as exc:
            raise BindingError(f"archive put {key}: {exc}") from exc
        return ObjectInfo(key, size, meta)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"archive object not found: {key}") from None
        try:
            meta = json.loads(self._meta_path(key).read_bytes())
        except (FileNotFoundError, ValueError):
            meta = {}
        return ObjectInfo(key, size, meta)

    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"archive object not found: {key}") from None
        return self._stream(f, chunk_size)

    @staticmethod
    def _stream(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in (META_DIR, TMP_DIR)]
                rel = ""
            for name in filenames:
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield ObjectInfo(key, self._path(key).stat().st_size)
            except FileNotFoundError:
                continue

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta_path(key).unlink(missing_ok=True)

    def cleanup(self, older_than_s: float) -> int:
        """Delete the temp files under DIR/.tmp last modified more than `older_than_s`
        seconds ago: writes a killed process never finished (a write in progress keeps
        its file's mtime fresh)."""
        limit = clock.now_s() - older_than_s
        removed = 0
        try:
            entries = list(os.scandir(self.root / TMP_DIR))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # finished or removed meanwhile
                continue
            except OSError as exc:
                raise BindingError(f"archive cleanup {entry.path}: {exc}") from exc
        return removed
