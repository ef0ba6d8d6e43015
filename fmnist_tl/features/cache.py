"""Training the head on cached backbone features: the Lightning callback and when it is on.

With a frozen backbone and no train-time augmentation, the backbone's output for an image never
changes, so it runs once per split (fmnist_tl.features.extraction, on the path fmnist_tl.features.probe measured
fastest here), its pooled features are kept on disk (fmnist_tl.features.store), and the head trains
on them (docs/feature-cache.md). `FeatureCache` swaps the datamodule's image datasets for
(features, labels) ones; the model stays one model: a 2-D batch goes straight to the head
(fmnist_tl.data.holds_features), and checkpoints still predict from images.
`feature_cache_for` decides whether a run uses the cache (`data.cache_features`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import filelock
import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from fmnist_tl.backbones import weights_sha256
from fmnist_tl.config import FeaturesConfig
from fmnist_tl.core import FmnistError
from fmnist_tl.data import holds_features
from fmnist_tl.features.extraction import extraction_settings, split_entry, store_dtype_for, work_at_224
from fmnist_tl.features.probe import Plan, Planner, probe_lock
from fmnist_tl.features.store import CacheResult, FeatureStore, load_or_extract

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


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

    def __init__(self, cache_dir: str | Path, settings: FeaturesConfig | None = None) -> None:
        self.store = FeatureStore(cache_dir)
        self.settings = settings or FeaturesConfig()
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
        s, pre = self.settings, pl_module.preprocess
        backend, precision = s.backend, s.precision
        n_images = sum(len(dm.split_tensors(split)[1]) for split in splits)
        work = work_at_224(n_images, pre.image_size)
        single_reason = "set explicitly"
        if work < s.probe_min_images and "auto" in (backend, precision):
            precision = "32" if precision == "auto" else precision
            backend = "torch" if backend == "auto" and precision != "int8" else backend
            # Said in the plan's one "Extraction:" line and recorded in metrics.json: the setting was auto.
            single_reason = (
                f"auto: below features.probe_min_images={s.probe_min_images}"
                f" ({work:.0f} images' worth of work at 224 px), probe skipped"
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
                self.plan = self._planner.choose(backend, precision, job_images=n_images, single_reason=single_reason)
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
            log.info("Feature cache off: the trainer's datamodule cannot serve features (no use_cached_features)")
            return
        splits = [s for s in STAGE_SPLITS.get(stage, ()) if not holds_features(dm.split_tensors(s)[0])]
        if not splits:  # already serving features (e.g. a second test in the same process)
            self._use_head_threads()
            return
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)  # probing and extraction want every core
        backbone_name = pl_module.hparams.get("backbone", type(pl_module.backbone).__name__)
        # The model keeps it once computed (its checkpoints record it too): hashing a big backbone is not free.
        weights_sha = getattr(pl_module, "weights_sha256", None) or weights_sha256(pl_module.backbone)
        pre = pl_module.preprocess
        device = trainer.strategy.root_device
        plan = self._plan_for(trainer, pl_module, dm, splits, backbone_name, weights_sha, device)
        precision = plan.candidate.precision
        store_dtype = store_dtype_for(self.settings.store_dtype, precision)
        quant_key = plan.quantization["key"] if plan.quantization else None
        jobs = []
        # A datamodule that knows its splits' identity (an image folder's store) saves hashing the pixels.
        split_fingerprint = getattr(dm, "split_fingerprint", None)
        for split in splits:
            images, labels = dm.split_tensors(split)
            data_sha = split_fingerprint(split) if split_fingerprint is not None else None
            name, fp = split_entry(
                backbone_name, weights_sha, pre, precision, store_dtype, split, images, labels, quant_key, data_sha
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
        plan.extractor.progress = self.settings.progress and trainer.is_global_zero
        try:
            for split, name, fp, images, labels, lock in jobs:
                feats, result = load_or_extract(
                    self.store, name, fp, images, labels, plan.extractor, extra_manifest=extra, lock=lock
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
    setting = cfg.data.get("cache_features", "auto")  # auto, true or false (schemas.DataConfig)
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
    return FeatureCache(cache_dir, extraction_settings(features_cfg))


def features_cache_dir(cfg: DictConfig) -> str:
    """features.cache_dir, or paths.cache_dir/features (configs without a features group, e.g. evaluate)."""
    return (cfg.get("features") or {}).get("cache_dir") or str(Path(cfg.paths.cache_dir) / "features")
