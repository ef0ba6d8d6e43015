"""Pooled backbone features, extracted once and cached on disk.

With a frozen backbone and no train-time augmentation, the backbone's output for an image never
changes, so running it in every epoch is wasted work: on a 2-core CPU a float32 ResNet50 at
224 px manages ~15 img/s, i.e. over an hour per epoch. Instead:

1. `FeatureExtractor` runs the backbone once over a split, as fast as torch allows: inference
   mode, the batched resize on the device (`ImagePreprocess`), fp32/bf16/fp16 autocast,
   channels_last, and `torch.compile` with inductor freezing when the job is big enough to repay
   the compile (eager fallback with one log line if compile fails). Which extractor runs -- this
   one or ONNX Runtime's (fp32, int8) -- and in which precision is measured on the machine by
   `fmnist_tl.probe` (fastest that passes the fidelity gate).
2. `FeatureStore` keeps the result under `paths.cache_dir` as safetensors + a JSON manifest
   (no pickle), named by a fingerprint of everything that changes the features. Writes are
   atomic, a corrupt or truncated file is detected by its checksum and rebuilt, and a file lock
   per entry makes concurrent jobs extract once while the others wait and load.
3. `FeatureCache` is a Lightning callback: in `setup` (in every process, after DDP is up) it
   swaps the datamodule's image datasets for (features, labels) datasets. The model stays one
   model: `TransferClassifier.logits` sends 2-D input straight to the head, and checkpoints
   still hold backbone + head and predict from images.

`feature_cache_for(cfg, model, datamodule)` decides whether a run uses the cache
(`data.cache_features`: auto/true/false) and says why in one log line when it does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import lightning as L
import safetensors.torch
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import nn

from fmnist_tl.probe import Plan, Planner, check_backend, probe_lock
from fmnist_tl.utils import FmnistError, atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the meaning of a fingerprint field changes
PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
BACKENDS = ("auto", "torch", "onnxruntime")
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
# Cache data files whose checksum this process verified: (path, size, mtime_ns, inode) -> sha256.
_CHECKED: dict[tuple, str] = {}


@dataclass(frozen=True)
class ExtractionSettings:
    """The `features` config group (conf/features/default.yaml)."""

    # Images per forward pass; null: 16 on CPU (small batches stay in cache: on a 2-core AVX512-BF16
    # CPU, compiled ResNet50 at 224 px ran 110 img/s at 8-16, 90 at 64, 84 at 128), 512 on CUDA.
    batch_size: int | None = None
    # auto | torch | onnxruntime, and auto | 32 | bf16 | 16 | int8: auto is chosen by the probe
    # (fmnist_tl/probe.py): the fastest candidate measured here that passes the fidelity gate.
    backend: str = "auto"
    precision: str = "auto"
    # auto: bfloat16 after bf16 extraction (lossless), float16 otherwise; or float16/bfloat16/float32.
    store_dtype: str = "auto"
    # auto: compile when the job is worth at least `compile_min_images` images at 224 px.
    compile: bool | str = "auto"
    compile_min_images: int = 4000
    progress: bool = True
    # CPU threads while training/evaluating the head on cached features; null leaves torch's
    # default. A head step is a few small matmuls: a second thread saves little, and on a busy
    # or oversubscribed CPU (parallel sweep jobs, shared machines) OpenMP barriers make it ~8x slower.
    head_threads: int | None = 1
    # Below this much work (images at 224 px) auto settings are not probed: torch, fp32.
    probe_min_images: int = 4000
    probe_batches: int = 4
    # int8 calibration and the fidelity gate's sample: disjoint seeded samples of the training split.
    calibration_images: int = 256
    gate_images: int = 128
    calibration_seed: int = 0
    # The fidelity gate: cosine similarity to fp32 features, mean and worst over the sample.
    gate_mean_cosine: float = 0.999
    gate_worst_cosine: float = 0.98

    @classmethod
    def from_config(cls, cfg: DictConfig | dict | None) -> ExtractionSettings:
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
        values.pop("cache_dir", None)
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise FmnistError(f"features.{unknown[0]} is not a features setting; see conf/features/default.yaml")
        settings = cls(**values)
        if settings.backend not in BACKENDS:
            raise FmnistError(f"features.backend={settings.backend} must be one of {', '.join(BACKENDS)}")
        if settings.precision not in ("auto", *PRECISIONS, "int8"):
            raise FmnistError(f"features.precision={settings.precision} must be one of auto, 32, bf16, 16, int8")
        if settings.store_dtype not in ("auto", *STORE_DTYPES):
            raise FmnistError(
                f"features.store_dtype={settings.store_dtype} must be one of auto, float16, bfloat16, float32"
            )
        if settings.compile not in ("auto", True, False):
            raise FmnistError(f"features.compile={settings.compile} must be auto, true or false")
        for key in ("batch_size", "head_threads"):
            value = getattr(settings, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FmnistError(f"features.{key}={value} must be a positive integer or null")
        for key, low in (
            ("probe_min_images", 0),
            ("probe_batches", 1),
            ("calibration_images", 1),
            ("gate_images", 1),
            ("calibration_seed", 0),
        ):
            value = getattr(settings, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FmnistError(f"features.{key}={value} must be an integer >= {low}")
        check_backend(settings.backend, settings.precision)
        for key in ("gate_mean_cosine", "gate_worst_cosine"):
            value = getattr(settings, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise FmnistError(f"features.{key}={value} must be a number in [-1, 1]")
        return settings


def store_dtype_for(setting: str, precision: str) -> str:
    if setting != "auto":
        return setting
    # Features computed in bf16 are exactly representable in bf16; float16 keeps more mantissa otherwise.
    return "bfloat16" if precision == "bf16" else "float16"


# --------------------------------------------------------------------------------------------
# Fingerprints


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, independent of device and memory layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """Identity of a module's weights (parameters and buffers, e.g. BatchNorm running stats).

    Hashing the tensors themselves covers every source alike: torchvision weights, a
    weights file, and a random init (seeded, so the same seed gives the same identity).
    """
    return tensors_sha256(module.state_dict())


def fingerprint(
    *,
    backbone: str,
    weights_sha256: str,
    image_size: int,
    mean: list[float],
    std: list[float],
    precision: str,
    store_dtype: str,
    split: str,
    data_sha256: str,
    count: int,
    quantization: str | None = None,
) -> dict[str, Any]:
    """Everything that changes the stored features. The device, compile and the backend do not (beyond
    float noise); an int8 model does, so int8 entries also hold its key (weights, calibration, settings)."""
    fp = {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "image_size": int(image_size),
        "mean": [round(float(m), 8) for m in mean],
        "std": [round(float(s), 8) for s in std],
        "precision": precision,
        "store_dtype": store_dtype,
        "split": split,
        # The split's exact images and labels, after subset and train/val carving.
        "data_sha256": data_sha256,
        "count": int(count),
    }
    if quantization is not None:
        fp["quantization"] = quantization
    return fp


def cache_key(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]


def split_entry(
    backbone_name: str,
    weights_sha256: str,
    preprocess: nn.Module,
    precision: str,
    store_dtype: str,
    split: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    quantization: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(entry name, fingerprint) of one split's features; the name ends in the fingerprint's key."""
    fp = fingerprint(
        backbone=backbone_name,
        weights_sha256=weights_sha256,
        image_size=preprocess.image_size,
        mean=preprocess.mean.flatten().tolist(),
        std=preprocess.std.flatten().tolist(),
        precision=precision,
        store_dtype=store_dtype,
        split=split,
        data_sha256=tensors_sha256({"images": images, "labels": labels}),
        count=len(labels),
        quantization=quantization,
    )
    tag = "-int8" if quantization else ""
    return f"{split}-{backbone_name}-{preprocess.image_size}px{tag}-{cache_key(fp)}", fp


# --------------------------------------------------------------------------------------------
# Extraction


class RateColumn(ProgressColumn):
    """Images per second, from rich's moving estimate."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.1f} img/s", style="progress.data.speed")


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class FeatureExtractor:
    """Runs a frozen backbone over uint8 (N, 1, 28, 28) images in one fast pass.

    The compiled function is kept between calls, so train, val and test pay for one compile.
    """

    backend = "torch"

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: nn.Module,
        device: torch.device | str = "cpu",
        precision: str = "32",
        compile: bool | str = "auto",
        compile_min_images: int = 4000,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise FmnistError(f"features.precision={precision} must be one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.backbone = backbone.eval().to(self.device, memory_format=torch.channels_last)
        self.preprocess = preprocess.to(self.device)
        self.precision = precision
        self.compile = compile
        self.compile_min_images = int(compile_min_images)
        self.batch_size = int(batch_size or (512 if self.device.type == "cuda" else 16))
        self.progress = progress
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compiled_used = False  # set after a call: did it run the compiled function?

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def should_compile(self, n_images: int) -> bool:
        if self.compile in (True, False):
            return bool(self.compile)
        # Compile costs ~30-60 s on a CPU; worth it once eager time clearly exceeds that.
        # Cost scales with pixels, so count work in 224-px image equivalents.
        work = n_images * (self.preprocess.image_size / 224) ** 2
        return work >= self.compile_min_images

    def __call__(self, images: torch.Tensor, description: str = "features") -> torch.Tensor:
        """uint8 (N, 1, 28, 28) on the CPU -> pooled features (N, D) float32 on the CPU."""
        if any(t.device != self.device for t in self.backbone.state_dict().values()):
            # Lightning moves the model back to the CPU at the end of fit, where the test stage's
            # extraction finds it. Moved outside inference mode: tensors made inside it would
            # be inference tensors, and loading the best checkpoint into them would fail.
            self.backbone.to(self.device)
        return self._extract(images, description)

    @torch.inference_mode()
    def _extract(self, images: torch.Tensor, description: str) -> torch.Tensor:
        n, bs = len(images), self.batch_size
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            images = images.pin_memory()  # lets the host-to-device copies overlap compute
        # Once compiled (a big split came first), smaller splits reuse it: the compile is paid for.
        use_compiled = self.should_compile(n) or self._compiled is not None
        if use_compiled and self._compiled is None:
            self._compiled = torch.compile(self._forward, dynamic=False)
        out: torch.Tensor | None = None
        self.compiled_used = False
        with progress_bar(self.progress) as bar, self._autocast(), torch._inductor.config.patch(freezing=True):
            task = bar.add_task(description, total=n)
            for start in range(0, n, bs):
                batch = images[start : start + bs].to(self.device, non_blocking=True)
                feats = self._run(batch, use_compiled)
                if out is None:
                    # Allocated outside the autograd-free tensors' world: a plain tensor the head can train on.
                    with torch.inference_mode(False):
                        out = torch.empty((n, feats.shape[1]), dtype=torch.float32, pin_memory=on_cuda)
                out[start : start + len(batch)].copy_(feats, non_blocking=True)
                bar.update(task, advance=len(batch))
        if on_cuda:
            torch.cuda.synchronize(self.device)
        if out is None:
            raise FmnistError(f"{description}: no images to extract features from")
        return out

    @torch.inference_mode()
    def run_eager(self, batch: torch.Tensor) -> torch.Tensor:
        """One eager batch (the probe times this), features back on the CPU."""
        with self._autocast():
            return self._forward(batch.to(self.device)).float().cpu()

    def _run(self, batch: torch.Tensor, use_compiled: bool) -> torch.Tensor:
        if not use_compiled or self._compiled is None:
            return self._forward(batch).float()
        # Pad the last batch to the full size: one static shape, no recompile.
        real = len(batch)
        if real < self.batch_size:
            pad = batch.new_zeros((self.batch_size - real, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
        try:
            feats = self._compiled(batch)
        except Exception as e:  # inductor/C++ toolchain problems surface at the first call
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile failed (%s: %s); extracting eagerly", type(e).__name__, first)
            self._compiled = None
            return self._forward(batch[:real]).float()
        self.compiled_used = True
        return feats[:real].float()


# --------------------------------------------------------------------------------------------
# On-disk store


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


# --------------------------------------------------------------------------------------------
# Lightning integration


def backbone_is_frozen(model: nn.Module) -> bool:
    """Cached features stand in for the backbone only if nothing in it can change during training."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not getattr(model, "freeze_backbone", False):
        return False
    return not any(p.requires_grad for p in backbone.parameters())


class FeatureCache(L.Callback):
    """Serves the datamodule's splits as cached (features, labels) instead of images.

    Runs in `setup`, i.e. in every process after the strategy has set up (so it knows the
    device and, under DDP, the rank). Under DDP, global rank 0 takes the entries' locks before a
    barrier, so it is the one that extracts while the other ranks wait on the lock, then load.
    """

    def __init__(self, cache_dir: str | Path, settings: ExtractionSettings | None = None) -> None:
        self.store = FeatureStore(cache_dir)
        self.settings = settings or ExtractionSettings()
        self.results: dict[str, CacheResult] = {}
        self.plan: Plan | None = None
        self._plan_key: tuple | None = None
        self._planner: Planner | None = None
        self._threads_before: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks; a compiled function or an ONNX session does not pickle and is
        # per process anyway (the probe and gate records on disk make re-planning cheap).
        return {**self.__dict__, "plan": None, "_plan_key": None, "_planner": None}

    def summary(self) -> dict[str, Any]:
        return {
            split: {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(result).items()}
            for split, result in self.results.items()
        }

    def extraction_summary(self) -> dict[str, Any] | None:
        """The chosen extraction path, the probe's img/s and the gate's figures (for metrics.json)."""
        return self.plan.summary() if self.plan is not None else None

    def _plan_for(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        dm: Any,
        splits: list[str],
        backbone_name: str,
        weights_sha: str,
        device: torch.device,
    ) -> Plan:
        """The extraction path for this model on this device: chosen once per process, reused by later stages."""
        key = (id(pl_module.backbone), weights_sha, str(device))
        if self.plan is not None and self._plan_key == key:
            return self.plan
        s, pre = self.settings, dm.preprocess
        backend, precision = s.backend, s.precision
        n_images = sum(len(dm.split_tensors(split)[1]) for split in splits)
        work = n_images * (pre.image_size / 224) ** 2
        if work < s.probe_min_images and "auto" in (backend, precision):
            precision = "32" if precision == "auto" else precision
            backend = "torch" if backend == "auto" and precision != "int8" else backend
            log.info(
                "Extraction probe skipped: %d images' worth of work at 224 px is below features.probe_min_images=%d",
                work,
                s.probe_min_images,
            )
        self._planner = Planner(
            root=self.store.root,
            settings=s,
            device=device,
            backbone=pl_module.backbone,
            backbone_name=backbone_name,
            preprocess=pre,
            weights_sha256=weights_sha,
            train_images=dm.image_splits["train"][0],  # calibration and gate images: training split only
        )
        lock = probe_lock(self.store.root)
        if trainer.world_size > 1 and trainer.is_global_zero:
            lock.acquire()  # rank 0 probes; the other ranks wait on the lock, then read its records
        if trainer.world_size > 1:
            trainer.strategy.barrier("fmnist_tl.features.probe")
        try:
            started = time.perf_counter()
            with lock:
                self.plan = self._planner.choose(backend, precision, job_images=n_images)
            # The choice's own cost (probe, export, calibration, quantisation, gate): nothing when cached.
            self.plan.seconds = round(time.perf_counter() - started, 2)
        finally:
            if trainer.world_size > 1 and trainer.is_global_zero:
                lock.release()
        self._plan_key = key
        return self.plan

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "use_cached_features"):
            log.info("Feature cache off: the trainer has no FashionMNISTDataModule to serve features from")
            return
        splits = [s for s in STAGE_SPLITS.get(stage, ()) if not dm.split_tensors(s)[0].is_floating_point()]
        if not splits:  # already serving features (e.g. a second test in the same process)
            self._use_head_threads()
            return
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)  # probing and extraction want every core
        backbone_name = pl_module.hparams.get("backbone", type(pl_module.backbone).__name__)
        # The model keeps it once computed (its checkpoints record it too); hashing ResNet50 takes ~0.5 s.
        weights_sha = getattr(pl_module, "backbone_sha256", None) or module_sha256(pl_module.backbone)
        pre = dm.preprocess
        device = trainer.strategy.root_device
        plan = self._plan_for(trainer, pl_module, dm, splits, backbone_name, weights_sha, device)
        precision = plan.candidate.precision
        store_dtype = store_dtype_for(self.settings.store_dtype, precision)
        quant_key = plan.quantization["key"] if plan.quantization else None
        jobs = []
        for split in splits:
            images, labels = dm.split_tensors(split)
            name, fp = split_entry(
                backbone_name, weights_sha, pre, precision, store_dtype, split, images, labels, quant_key
            )
            jobs.append((split, name, fp, images, labels, self.store.lock(name)))

        extra = {
            "weights_id": getattr(pl_module, "weights_id", None),
            "device": str(device),
            "extracted_by": {"global_rank": trainer.global_rank, "pid": os.getpid()},
            "extraction": plan.summary(),
            **dm.split_info(),
        }
        held: list[filelock.FileLock] = []
        if trainer.world_size > 1:
            # Rank 0 holds every lock before anyone looks, so it extracts and the others wait on the
            # lock (a file lock, not a collective: no NCCL/gloo timeout however long extraction takes).
            if trainer.is_global_zero:
                for job in jobs:
                    job[-1].acquire()
                    held.append(job[-1])
            trainer.strategy.barrier("fmnist_tl.features.locks")
        extractor = plan.extractor
        try:
            for split, name, fp, images, labels, lock in jobs:
                extractor.progress = self.settings.progress and trainer.is_global_zero
                feats, result = load_or_extract(
                    self.store, name, fp, images, labels, extractor, extra_manifest=extra, lock=lock
                )
                if lock in held:
                    lock.release()
                    held.remove(lock)
                dm.use_cached_features(split, feats)
                self.results[split] = result
                if result.status == "hit":
                    log.info("Feature cache hit for %s: %s (%.1f s)", split, name, result.seconds)
        finally:
            for lock in held:
                lock.release()
            if self._planner is not None:
                self._planner.close()  # the quantiser's scratch files; the models stay in the store
        self._use_head_threads()

    def _use_head_threads(self) -> None:
        # On a GPU too: there the CPU only gathers batches, and 16 idle-spinning OpenMP threads
        # around tiny ops cost more than they give.
        if self.settings.head_threads:
            self._threads_before = self._threads_before or torch.get_num_threads()
            torch.set_num_threads(min(self.settings.head_threads, self._threads_before))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def feature_cache_for(cfg: DictConfig, model: nn.Module, datamodule: Any) -> FeatureCache | None:
    """The FeatureCache callback when this run should train on cached features, else None.

    `data.cache_features`: auto (on when the backbone is fully frozen and augmentation is off),
    true (on; an error if it cannot be), false (off). When off, one log line says why.
    """
    setting = cfg.data.get("cache_features", "auto")
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        setting = setting.lower() == "true"
    if setting not in ("auto", True, False):
        raise FmnistError(f"data.cache_features={setting} must be auto, true or false")
    reasons = []
    if not backbone_is_frozen(model):
        reasons.append("the backbone is trainable (model.freeze_backbone=false or model.finetune)")
    if getattr(datamodule, "augment", False):
        reasons.append("train-time augmentation is on (data.augment=true)")
    if setting is True and reasons:
        raise FmnistError(
            f"data.cache_features=true but {' and '.join(reasons)}: fixed features would ignore that; "
            "use data.cache_features=auto or false"
        )
    if setting is False:
        log.info("Feature cache off (data.cache_features=false): the backbone runs on every batch")
        return None
    if setting == "auto" and cfg.trainer.get("fast_dev_run"):
        reasons.append("trainer.fast_dev_run sees one batch, extracting every image would cost more")
    if reasons:
        log.info("Feature cache off: %s; the backbone runs on every batch", "; ".join(reasons))
        return None
    features_cfg = cfg.get("features") or {}
    cache_dir = features_cache_dir(cfg)
    log.info("Feature cache on: frozen backbone, no augmentation; cache in %s", cache_dir)
    return FeatureCache(cache_dir, ExtractionSettings.from_config(features_cfg))


def features_cache_dir(cfg: DictConfig) -> str:
    """features.cache_dir, or paths.cache_dir/features (configs without a features group, e.g. evaluate)."""
    return (cfg.get("features") or {}).get("cache_dir") or str(Path(cfg.paths.cache_dir) / "features")
