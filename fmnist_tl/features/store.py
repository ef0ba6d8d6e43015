"""The on-disk feature cache: one split's pooled features per entry, safe across processes.

`FeatureStore` keeps each entry under `paths.cache_dir` as safetensors + a JSON manifest (no
pickle; fmnist_tl.features.manifest), named by a fingerprint of everything that changes the features
(fmnist_tl.features.extraction). Writes are atomic, a corrupt or truncated file is detected by its
checksum and rebuilt, and a file lock per entry makes concurrent jobs extract once while the
others wait and load (`load_or_extract`). `cached_features` is the same path for one split outside Lightning.
"""

from __future__ import annotations

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

from fmnist_tl.backbones import weights_sha256
from fmnist_tl.core import FmnistError
from fmnist_tl.features.extraction import STORE_DTYPES, FeatureExtractor, split_entry, store_dtype_for
from fmnist_tl.features.manifest import ManifestStore, manifest_head

log = logging.getLogger(__name__)


class FeatureStore(ManifestStore):
    """One split's features per entry: a safetensors file (features, labels; no pickle) + its manifest."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(
            root,
            ".safetensors",
            "feature cache",
            "set paths.cache_dir to a writable folder with space, or data.cache_features=false",
        )

    def load(self, name: str, fp: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """(tensors, None) on a valid hit; (None, None) when absent; (None, why) when unusable."""
        manifest, problem = self.manifest(name, fp)
        if manifest is None:
            return None, problem
        try:
            tensors = safetensors.torch.load_file(str(self.paths(name)[0]))
        except Exception as e:  # safetensors raises its own error types for bad headers
            return None, f"unreadable safetensors ({type(e).__name__})"
        feats = tensors.get("features")
        if feats is None or list(feats.shape) != manifest.get("shape") or str(feats.dtype) != manifest.get("dtype"):
            return None, "tensor shape or dtype differs from the manifest"
        return tensors, None

    def save(self, name: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
        feats = tensors["features"]
        self.commit(name, blob, {**manifest, "shape": list(feats.shape), "dtype": str(feats.dtype)})


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
    holds it (see ManifestStore.hold).
    """
    start = time.perf_counter()
    with store.hold(name, lock):
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
                **manifest_head(fp),
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
        backbone_name, weights_sha256(backbone), preprocess, precision, store_dtype, split, images, labels
    )
    if extractor is None:
        extractor = FeatureExtractor(backbone, preprocess, precision=precision, **extractor_kwargs)
    return load_or_extract(FeatureStore(cache_dir), name, fp, images, labels, extractor)
