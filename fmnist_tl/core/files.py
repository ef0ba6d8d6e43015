"""Atomic file writes and file and tensor hashes: what every layer that writes or keys files uses."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fmnist_tl.core.errors import FmnistError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's directory; on success it replaces `path` in one step.

    A crash (or ENOSPC) mid-write leaves the previous file untouched and removes the temp file,
    so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FmnistError(f"{path}: no space left on device; free space and rerun (old file kept)") from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_between(text: str, start: str, end: str, body: str) -> str | None:
    """`text` with what lies between the markers `start` and `end` replaced by `body`; None without both."""
    before, found_start, rest = text.partition(start)
    _, found_end, after = rest.partition(end)
    return f"{before}{start}{body}{end}{after}" if found_start and found_end else None


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Delete temp files an earlier process left behind when it was killed mid-write."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, independent of device and memory layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """Identity of a module's weights (parameters and buffers, e.g. BatchNorm running stats).

    Hashing the tensors themselves covers every source alike: torchvision weights, a
    weights file, and a random init (seeded, so the same seed gives the same identity).
    """
    return tensors_sha256(module.state_dict())
