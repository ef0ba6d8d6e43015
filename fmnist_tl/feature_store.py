"""The on-disk feature cache: one split's pooled features per entry, safe across processes.

`FeatureStore` keeps each entry under `paths.cache_dir` as safetensors + a JSON manifest (no
pickle), named by a fingerprint of everything that changes the features (fmnist_tl.extraction).
Writes are atomic, a corrupt or truncated file is detected by its checksum and rebuilt, and a
file lock per entry makes concurrent jobs extract once while the others wait and load
(`load_or_extract`). `cached_features` is the same path for one split outside Lightning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import safetensors.torch
import torch
from torch import nn

from fmnist_tl.extraction import STORE_DTYPES, FeatureExtractor, cache_key, split_entry, store_dtype_for
from fmnist_tl.utils import FmnistError, atomic_write_bytes, atomic_write_json, module_sha256, sha256_file

log = logging.getLogger(__name__)

# Cache data files whose checksum this process verified: (path, size, mtime_ns, inode) -> sha256.
_CHECKED: dict[tuple, str] = {}


class FeatureStore:
    """safetensors file + JSON manifest per cache entry, a lock file beside them.

    The manifest is written after the data file and holds its sha256, so it is the commit mark:
    no manifest means no entry, and a manifest whose checksum does not match means corrupt.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        return (
            self.root / f"{name}.safetensors",
            self.root / f"{name}.json",
            self.root / f"{name}.lock",
        )

    def unwritable(self, e: OSError) -> FmnistError:
        return FmnistError(
            f"feature cache {self.root}: cannot write ({type(e).__name__}: {e.strerror or e}); "
            "set paths.cache_dir to a writable folder with space, or data.cache_features=false"
        )

    def lock(self, name: str) -> filelock.FileLock:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self.unwritable(e) from e
        return filelock.FileLock(str(self.paths(name)[2]))

    def load(self, name: str, fp: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """(tensors, None) on a valid hit; (None, None) when absent; (None, why) when unusable."""
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
        size = data_path.stat().st_size
        if size != manifest.get("bytes"):
            return None, f"data file is {size} bytes, manifest says {manifest.get('bytes')} (truncated?)"
        # A sweep's trials load the same entries again and again in one process: a file already
        # checked, unchanged since (same inode, size and mtime), is not hashed again.
        stat = data_path.stat()
        checked = (str(data_path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if _CHECKED.get(checked) != manifest.get("sha256"):
            if sha256_file(data_path) != manifest.get("sha256"):
                return None, "checksum mismatch"
            _CHECKED[checked] = manifest["sha256"]
        try:
            tensors = safetensors.torch.load_file(str(data_path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            return None, f"unreadable safetensors ({type(e).__name__})"
        feats = tensors.get("features")
        if feats is None or list(feats.shape) != manifest.get("shape") or str(feats.dtype) != manifest.get("dtype"):
            return None, "tensor shape or dtype differs from the manifest"
        return tensors, None

    def save(self, name: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        data_path, manifest_path, _ = self.paths(name)
        blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
        feats = tensors["features"]
        manifest = {
            **manifest,
            "file": data_path.name,
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "shape": list(feats.shape),
            "dtype": str(feats.dtype),
        }
        try:  # data first, manifest last: a crash in between leaves no valid-looking entry
            atomic_write_bytes(data_path, blob)
            atomic_write_json(manifest_path, manifest)
        except OSError as e:
            raise self.unwritable(e) from e


@dataclass
class CacheResult:
    split: str
    status: str  # hit | extracted | rebuilt
    count: int
    entry: str
    seconds: float
    images_per_s: float | None = None
    compiled: bool | None = None


def load_or_extract(
    store: FeatureStore,
    name: str,
    fp: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    extract: Callable[..., torch.Tensor],
    extra_manifest: dict[str, Any] | None = None,
    lock: filelock.FileLock | None = None,
) -> tuple[torch.Tensor, CacheResult]:
    """Features for one split from the store, or extracted and stored; safe across processes.

    Everything happens under the entry's file lock: a second process asking for the same entry
    waits while the first extracts, then loads what it wrote. Pass `lock` when the caller already
    holds it (the same FileLock object is re-entrant; a second object on the same file is not).
    """
    lock = lock or store.lock(name)
    start = time.perf_counter()
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("Feature cache %s is being built by another process; waiting for it", name)
        lock.acquire()
    except OSError as e:  # read-only or full file system: the lock file cannot be created
        raise store.unwritable(e) from e
    try:
        # Holding this entry's lock, no live writer can own its temp files: any left are from a crash.
        for stale in store.root.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
        tensors, problem = store.load(name, fp)
        if tensors is not None and torch.equal(tensors["labels"], labels.to(tensors["labels"].dtype)):
            return tensors["features"], CacheResult(fp["split"], "hit", len(labels), name, time.perf_counter() - start)
        if tensors is not None:
            problem = "labels differ from the data"
        if problem:
            log.warning("Feature cache %s unusable: %s; rebuilding it", store.paths(name)[0], problem)
        t0 = time.perf_counter()
        feats32 = extract(images, description=f"{fp['split']} features")
        seconds = time.perf_counter() - t0
        dtype = STORE_DTYPES[fp["store_dtype"]]
        feats = feats32.to(dtype)
        if not torch.isfinite(feats).all():
            hint = " (float16 overflow: set features.store_dtype=bfloat16)" if torch.isfinite(feats32).all() else ""
            raise FmnistError(f"features for {fp['split']} are not finite{hint}; check the backbone weights")
        del feats32
        rate = len(images) / seconds if seconds > 0 else None
        compiled = getattr(extract, "compiled_used", None)
        store.save(
            name,
            {"features": feats, "labels": labels.to(torch.int64)},
            {
                "fingerprint": fp,
                "key": cache_key(fp),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "extraction_seconds": round(seconds, 3),
                "images_per_s": round(rate, 2) if rate else None,
                "compiled": compiled,
                "torch": torch.__version__,
                **(extra_manifest or {}),
            },
        )
        status = "rebuilt" if problem else "extracted"
        backend = getattr(extract, "backend", "torch")
        log.info(
            "Extracted %s features: %d images in %.1f s (%.1f img/s, %s, %s) -> %s",
            fp["split"],
            len(images),
            seconds,
            rate or math.nan,
            fp["precision"],
            backend if backend != "torch" else ("compiled" if compiled else "eager"),
            store.paths(name)[0],
        )
        return feats, CacheResult(fp["split"], status, len(labels), name, time.perf_counter() - start, rate, compiled)
    finally:
        lock.release()


def cached_features(
    cache_dir: str | Path,
    split: str,
    backbone_name: str,
    backbone: nn.Module,
    preprocess: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    precision: str = "32",
    store_dtype: str = "auto",
    extractor: FeatureExtractor | None = None,
    **extractor_kwargs: Any,
) -> tuple[torch.Tensor, CacheResult]:
    """One split's features through the cache, outside Lightning (scripts, benchmarks, tests)."""
    store_dtype = store_dtype_for(store_dtype, precision)
    name, fp = split_entry(
        backbone_name, module_sha256(backbone), preprocess, precision, store_dtype, split, images, labels
    )
    if extractor is None:
        extractor = FeatureExtractor(backbone, preprocess, precision=precision, **extractor_kwargs)
    return load_or_extract(FeatureStore(cache_dir), name, fp, images, labels, extractor)
