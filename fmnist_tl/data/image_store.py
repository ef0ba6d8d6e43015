"""A folder's images decoded once into a uint8 store on disk, read back row by row.

One store per (file list, file sizes and mtimes, stored size): its folder under the cache is named
by a hash of those, so a changed, added or removed file makes a new store and an unchanged folder
opens the old one without decoding anything. Layout: `images.u8` (rows of uint8 (3, S, S), in the
order of the file list) and `manifest.json` (the fingerprint, the files and labels, the files that
could not be read). A store is built in a temporary folder (disk space reserved up front, the
manifest written last) and renamed into place: a decode stopped by Ctrl-C, a crash or a full disk
leaves no folder under the store's name, so no later run trusts half a store.

Reading: `ImageStore.read_rows` copies just the rows asked for (one `os.preadv` per run of
consecutive rows) into a fresh tensor. The file is not memory-mapped for reading on purpose: mapped
pages that were read count in the process's RSS until the kernel drops them, so a pass over a
large store would show the whole store as RSS; read through the page cache, RSS stays at the
batch being read.

Decoding runs in worker processes, one per core (Pillow's JPEG draft mode decodes at a reduced
scale where the stored size allows); each writes its rows straight into the file
(`os.pwrite`), so neither the workers nor this process hold the images in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from torch.utils.data import Dataset

from fmnist_tl.core import FmnistError, progress_bar
from fmnist_tl.data.images import BadImage, load_rgb

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when the layout or the way rows are decoded changes
DATA_FILE, MANIFEST = "images.u8", "manifest.json"
# Files per task sent to a worker: enough to amortise the round trip, small enough for a live bar.
CHUNK = 32
# Below this many files a process pool costs more than it saves.
POOL_MIN_FILES = 64


@dataclass
class ImageStore:
    """An opened store of `count` uint8 (3, size, size) rows; `read_rows` reads them."""

    path: Path
    key: str
    count: int
    size: int
    skipped: list[tuple[str, str]]  # (file, reason) of files left out (data.on_bad_file=skip)
    decoded: bool  # True when this call decoded it, False when it opened an existing store
    skipped_rows: tuple[int, ...] = ()  # their rows, left zero

    @property
    def valid(self) -> torch.Tensor:
        """Bool mask of the rows that hold an image."""
        mask = torch.ones(self.count, dtype=torch.bool)
        mask[list(self.skipped_rows)] = False
        return mask

    def _fd(self) -> int:
        # One descriptor per process (DataLoader workers forked from this one open their own).
        fd = self.__dict__.get("_fd_of", {}).get(os.getpid())
        if fd is None:
            fd = os.open(self.path / DATA_FILE, os.O_RDONLY)
            self.__dict__.setdefault("_fd_of", {})[os.getpid()] = fd
        return fd

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd_of"}

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 (len(rows), 3, size, size): the given rows, in the given order."""
        r = rows.reshape(-1).long().numpy()
        out = np.empty((len(r), 3 * self.size * self.size), dtype=np.uint8)
        row_bytes = out.shape[1]
        if len(r):
            breaks = np.flatnonzero(np.diff(r) != 1) + 1
            fd = self._fd()
            for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(r)], strict=True):
                want = (end - start) * row_bytes
                got = os.preadv(fd, [out[start:end]], int(r[start]) * row_bytes)
                if got != want:
                    raise FmnistError(f"image store {self.path}: rows missing from its data file; delete the folder")
        return torch.from_numpy(out).view(len(r), 3, self.size, self.size)


def store_fingerprint(root: Path, files: Sequence[str], size: int) -> dict:
    """Everything that changes the decoded rows: each file's path, size and mtime, and the stored size."""
    entries = []
    for rel in files:
        st = (root / rel).stat()
        entries.append([rel, st.st_size, st.st_mtime_ns])
    return {"format": STORE_FORMAT, "size": int(size), "files": entries}


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]


def open_or_build(
    cache_dir: str | os.PathLike,
    root: str | os.PathLike,
    files: Sequence[str],
    labels: Sequence[int],
    size: int,
    on_bad_file: str = "error",
    workers: int | None = None,
    progress: bool = True,
) -> ImageStore:
    """The store of `files` (paths relative to `root`) at `size`: opened if built before, else decoded.

    Files that cannot be read are recorded in the manifest (their rows stay zero). With
    on_bad_file=error the first of them is a one-line error; with skip they are left out. Either
    way the store is complete for what it records, so switching to skip decodes nothing again.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    fp = store_fingerprint(root, files, size)
    key = fingerprint_key(fp)
    path = cache_dir / f"{root.resolve().name or 'root'}-{size}px-{key}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path) + ".lock")
    except OSError as e:
        raise FmnistError(f"image store {cache_dir}: cannot write ({e.strerror or e}); set data.cache_dir") from e
    with lock:  # a second process building the same store waits, then opens it
        store = _open(path, key, len(files), size)
        if store is None:
            if path.exists():
                log.warning("Image store %s is damaged; decoding it again", path)
                shutil.rmtree(path, ignore_errors=True)
            _build(path, root, files, labels, size, fp, workers, progress)
            store = _open(path, key, len(files), size)
            if store is None:
                raise FmnistError(f"image store {path}: written but unreadable; delete it and run again")
            store.decoded = True
    if store.skipped and on_bad_file == "error":
        rel, reason = store.skipped[0]
        raise bad_file_error(root / rel, reason)
    return store


def bad_file_error(path: Path, reason: str) -> FmnistError:
    return FmnistError(f"{path}: {reason}; fix or remove the file, or set data.on_bad_file=skip to leave it out")


def _open(path: Path, key: str, count: int, size: int) -> ImageStore | None:
    """The store at `path` if its manifest matches and its data file has every row; else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        data = path / DATA_FILE
        if manifest.get("key") != key or data.stat().st_size != count * 3 * size * size:
            return None
    except (OSError, ValueError):
        return None
    skipped = [(rel, reason) for _, rel, reason in manifest.get("skipped", [])]
    rows = tuple(int(row) for row, _, _ in manifest.get("skipped", []))
    return ImageStore(path, key, count, size, skipped, decoded=False, skipped_rows=rows)


def _build(
    path: Path,
    root: Path,
    files: Sequence[str],
    labels: Sequence[int],
    size: int,
    fp: dict,
    workers: int | None,
    progress: bool,
) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        data = tmp / DATA_FILE
        nbytes = len(files) * 3 * size * size
        with open(data, "wb") as f:
            # Reserve the space now: a full disk fails here, not after an hour of decoding.
            if hasattr(os, "posix_fallocate") and nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
        failures = decode_into(data, root, files, size, workers, progress)
        with open(data, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "key": fingerprint_key(fp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "root": str(root.resolve()),
            "size": size,
            "count": len(files),
            "files": list(files),
            "labels": [int(x) for x in labels],
            "skipped": [[row, files[row], reason] for row, reason in sorted(failures.items())],
            "fingerprint": fp,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))  # last: the store is complete
        os.replace(tmp, path)
    except OSError as e:
        raise FmnistError(
            f"image store {path.parent}: cannot write ({type(e).__name__}: {e.strerror or e}); "
            "free disk space or point data.cache_dir elsewhere"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("Decoded %d images into %s in %.1f s (%.0f img/s)", len(files), path, seconds, len(files) / seconds)


# ---------------------------------------------------------------------------------------------
# Splits as views of the store (fmnist_tl.data.image_folder)


class StoredRows:
    """Rows of the store standing in for a split's uint8 (N, 3, S, S) tensor.

    Indexing (an int, a slice, an index tensor) reads only those rows from the store's file, so the
    feature cache, the probe and the report slice a split as they would a tensor, and nothing ever
    holds the whole split in memory.
    """

    ndim = 4
    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, store: ImageStore, rows: torch.Tensor) -> None:
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.store.size, self.store.size))

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows = self.rows[index]
        images = self.store.read_rows(rows)
        return images[0] if rows.ndim == 0 else images

    def pin_memory(self) -> StoredRows:
        return self  # batches are gathered into fresh tensors anyway


class StoredSplit(Dataset):
    """(image, label) items of a split; `.tensors` as a TensorDataset has them (fmnist_tl.data.splits)."""

    def __init__(self, images: StoredRows, labels: torch.Tensor) -> None:
        self.tensors = (images, labels)

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[0][i], self.tensors[1][i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # One gather per batch instead of one per image.
        images = self.tensors[0][torch.as_tensor(indices)]
        labels = self.tensors[1][indices]
        return list(zip(images, labels, strict=True))


# ---------------------------------------------------------------------------------------------
# Decoding, in worker processes

_fd: int | None = None


def _open_for_writing(data: str) -> None:
    global _fd
    _fd = os.open(data, os.O_WRONLY)


def decode_rows(root: str, size: int, tasks: Sequence[tuple[int, str]], fd: int | None = None) -> list[tuple]:
    """Decode (row, file) pairs into the data file at `fd`; returns (row, reason) of unreadable files."""
    fd = _fd if fd is None else fd
    row_bytes = 3 * size * size
    failures = []
    for row, rel in tasks:
        try:
            pixels = load_rgb(Path(root) / rel, size)
        except BadImage as e:
            failures.append((row, str(e)))
            continue
        os.pwrite(fd, pixels.numpy().tobytes(), row * row_bytes)
    return failures


def decode_into(
    data: Path, root: Path, files: Sequence[str], size: int, workers: int | None = None, progress: bool = True
) -> dict[int, str]:
    """Decode every file into its row of `data`, on `workers` processes (default: every core)."""
    tasks = list(enumerate(files))
    chunks = [tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    workers = workers or os.cpu_count() or 1
    failures: dict[int, str] = {}
    if workers == 1 or len(tasks) < POOL_MIN_FILES:
        fd = os.open(data, os.O_WRONLY)
        try:
            with progress_bar(progress) as bar:
                task = bar.add_task("decoding images", total=len(tasks))
                for chunk in chunks:
                    failures.update(decode_rows(str(root), size, chunk, fd))
                    bar.update(task, advance=len(chunk))
        finally:
            os.close(fd)
        return failures
    # fork: workers start at once (a fresh interpreter would import torch first). The pool is made
    # before the progress bar starts its refresh thread; the workers only run Pillow and os.pwrite.
    # Leaving the block terminates the workers, on Ctrl-C too.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(workers, len(chunks)), initializer=_open_for_writing, initargs=(str(data),)) as pool:
        with progress_bar(progress) as bar:
            task = bar.add_task("decoding images", total=len(tasks))
            jobs = [(str(root), size, chunk) for chunk in chunks]
            for chunk, result in zip(chunks, pool.imap(_decode_job, jobs), strict=True):
                failures.update(result)
                bar.update(task, advance=len(chunk))
    return failures


def _decode_job(job: tuple) -> list[tuple]:
    return decode_rows(*job)
