"""Files on disk that a run can trust: one data file + JSON manifest + lock file per entry.

The feature cache (fmnist_tl.features.store) and the ONNX model store (fmnist_tl.features.onnx_backend)
both keep expensive results this way. The manifest is written after the data file and holds its
size and sha256, so it is the commit mark: no manifest means no entry, and a manifest that the
file does not match means a damaged entry, which the caller rebuilds. Writes are atomic, and
the entry's file lock makes concurrent jobs build it once while the others wait, then load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from fmnist_tl.core import FmnistError, atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

# Data files whose checksum this process verified: (path, size, mtime_ns, inode) -> sha256.
_CHECKED: dict[tuple, str] = {}


def fingerprint_key(fp: dict[str, Any], digits: int = 24) -> str:
    """A short stable name for a fingerprint (a dict of everything that changes an entry): the first
    `digits` hex digits of its sha256. Cache entries and ONNX models use 24, probe and gate records 20."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:digits]


def manifest_head(fp: dict[str, Any]) -> dict[str, Any]:
    """What every manifest starts with: the fingerprint, its key and when the entry was written."""
    return {"fingerprint": fp, "key": fingerprint_key(fp), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ManifestStore:
    """Entries under `root`: `<name><suffix>`, `<name>.json` (the manifest) and `<name>.lock`.

    `what` names the store in messages ("feature cache"); `fix` is what a user can do when the
    store cannot be written.
    """

    def __init__(self, root: str | os.PathLike, suffix: str, what: str, fix: str) -> None:
        self.root = Path(root)
        self.suffix = suffix
        self.what = what
        self.fix = fix

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        return self.root / f"{name}{self.suffix}", self.root / f"{name}.json", self.root / f"{name}.lock"

    def unwritable(self, e: OSError) -> FmnistError:
        return FmnistError(f"{self.what} {self.root}: cannot write ({type(e).__name__}: {e.strerror or e}); {self.fix}")

    def lock(self, name: str) -> filelock.FileLock:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self.unwritable(e) from e
        return filelock.FileLock(str(self.paths(name)[2]))

    @contextlib.contextmanager
    def hold(self, name: str, lock: filelock.FileLock | None = None) -> Iterator[None]:
        """Hold the entry's lock (waiting, with one log line, while another process builds it).

        Pass `lock` when the caller already holds it (the same FileLock object is re-entrant; a
        second object on the same file is not).
        """
        lock = lock or self.lock(name)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            log.info("%s entry %s is being built by another process; waiting for it", self.what, name)
            lock.acquire()
        except OSError as e:  # read-only or full file system: the lock file cannot be created
            raise self.unwritable(e) from e
        try:
            # Holding this entry's lock, no live writer can own its temp files: any left are from a crash.
            for stale in self.root.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            lock.release()

    def manifest(self, name: str, fp: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) when the entry is whole; (None, None) when absent; (None, why) when unusable."""
        data_path, manifest_path, _ = self.paths(name)
        if not manifest_path.exists():
            return None, ("data file without a manifest (interrupted write)" if data_path.exists() else None)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            return None, f"manifest unreadable ({type(e).__name__})"
        if not isinstance(manifest, dict) or manifest.get("fingerprint") != fp:
            return None, "manifest does not match the fingerprint"
        if not data_path.exists():
            return None, "data file missing"
        stat = data_path.stat()
        if stat.st_size != manifest.get("bytes"):
            return None, f"data file is {stat.st_size} bytes, manifest says {manifest.get('bytes')} (truncated?)"
        # A sweep's trials load the same entries again and again in one process: a file already
        # checked, unchanged since (same inode, size and mtime), is not hashed again.
        checked = (str(data_path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if _CHECKED.get(checked) != manifest.get("sha256"):
            if sha256_file(data_path) != manifest.get("sha256"):
                return None, "checksum mismatch"
            _CHECKED[checked] = manifest["sha256"]
        return manifest, None

    def commit(self, name: str, data: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the data file, then the manifest that commits it (its size and sha256 added)."""
        data_path, manifest_path, _ = self.paths(name)
        manifest = {**manifest, "file": data_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        try:  # data first, manifest last: a crash in between leaves no valid-looking entry
            atomic_write_bytes(data_path, data)
            atomic_write_json(manifest_path, manifest)
        except OSError as e:
            raise self.unwritable(e) from e
        return manifest
