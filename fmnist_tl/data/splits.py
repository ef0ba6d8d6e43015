"""What both datamodules share: splits held as (images, labels) tensors, loaders, and cached features.

A split is a dataset with `.tensors = (uint8 images (N, C, H, W), int64 labels (N,))`: Fashion-MNIST
holds it in memory (`TensorDataset`), a folder of images in a memory-mapped store
(fmnist_tl.data.image_folder). The feature cache swaps a split for (features, labels) (`holds_features`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from fmnist_tl.config import one_of
from fmnist_tl.core import FmnistError


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation fixed by (seed, epoch), so a resumed run sees the same order.

    Lightning calls `set_epoch` on samplers that have it at the start of every epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class DeviceBatches:
    """(features, labels) batches served from tensors already on the device, instead of a DataLoader.

    For cached features: the whole split lives on the device (pooled features are small), and each
    batch is an index into it, from a permutation fixed by (seed, epoch): no per-step host work, copy
    or sync on a GPU, no per-item fetch and collate on a CPU. On a CPU the order and batches are
    `EpochShuffleSampler`'s with a DataLoader (same generator, same draw).
    """

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int, epoch=None
    ) -> None:
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.epoch = epoch or (lambda: 0)  # a callable: the datamodule's trainer knows the current epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n, bs = len(self.labels), self.batch_size
        if not self.shuffle:
            for start in range(0, n, bs):
                yield self.features[start : start + bs], self.labels[start : start + bs]
            return
        g = torch.Generator(device=self.features.device).manual_seed(self.seed * 100_003 + int(self.epoch()))
        order = torch.randperm(n, device=self.features.device, generator=g)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            yield self.features[idx], self.labels[idx]


def holds_features(x: torch.Tensor) -> bool:
    """True when a split's tensor or a batch holds cached backbone features rather than images.

    The cached-features contract, in one place. Images are 4-D: uint8 (N, C, H, W) in a split,
    float (B, 3, H, W) once preprocessed on the device. Pooled backbone features are 2-D (N, D).
    The feature cache (fmnist_tl.features.FeatureCache) swaps a split's images for its features
    with `SplitsDataModule.use_cached_features`; from then on this test is what makes the
    datamodule skip preprocessing (and serve the split as whole-tensor batches), and what makes
    `TransferClassifier.logits` send the batch straight to the head.
    """
    return x.ndim == 2


class SplitsDataModule(L.LightningDataModule):
    """The loaders, cached-feature serving and device-side preprocessing of both datamodules.

    A subclass sets `data_train`/`data_val`/`data_test` in `setup`, and `class_names`; it implements
    `augment_images`, `input_spec` and `split_info`.
    """

    class_names: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        augment: bool = False,
        seed: int = 42,
        cache_features: str | bool = "auto",
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        one_of("auto", True, False)("data.pin_memory", pin_memory)  # the schema's rule, for Python callers
        self.pin_memory = pin_memory
        self.augment = bool(augment)
        self.seed = int(seed)
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        # id(dataset) -> (dataset, features, labels) on the device, for DeviceBatches (cached features).
        self._device_tensors: dict[int, tuple] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def follow(self, model: Any) -> None:
        """Take what the data config leaves open from a trained model (image folders: the stored size),
        for commands that read data without a Trainer (export)."""

    def input_spec(self) -> dict[str, Any]:
        """What a batch's images are: {"kind", "channels", "height", "width"} (checkpoints record it)."""
        raise NotImplementedError

    def split_info(self) -> dict[str, Any]:
        """How the splits were made, recorded in feature-cache manifests for people reading them."""
        raise NotImplementedError

    # --- cached features (see holds_features) -------------------------------------------------
    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (N, C, H, W) or cached features (N, D), labels) of train/val/test after setup."""
        dataset = getattr(self, f"data_{split}", None)
        if not hasattr(dataset, "tensors"):
            raise FmnistError(f"split {split!r} is not set up; call setup() first")
        return dataset.tensors[0], dataset.tensors[1]

    def use_cached_features(self, split: str, features: torch.Tensor) -> None:
        """Serve (pooled features (N, D), labels) for this split instead of its images (holds_features)."""
        labels = self.split_tensors(split)[1]
        if not holds_features(features):
            raise FmnistError(f"cached {split} features must be 2-D (N, D), got shape {tuple(features.shape)}")
        if len(features) != len(labels):
            raise FmnistError(f"cached {split} features hold {len(features)} rows for {len(labels)} labels")
        setattr(self, f"data_{split}", TensorDataset(features, labels))

    # -------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader | DeviceBatches:
        distributed = self.trainer is not None and self.trainer.world_size > 1
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        cached = isinstance(dataset, TensorDataset) and holds_features(dataset.tensors[0])
        if cached and device is not None and not distributed:
            return self.device_batches(dataset, shuffle, batch_size, device)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle and not distributed else None,
            shuffle=shuffle and distributed,  # Lightning swaps in a seeded DistributedSampler
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def _pin_memory(self) -> bool:
        if self.pin_memory != "auto":
            return bool(self.pin_memory)
        # auto: page-locked batches let the host-to-device copy overlap compute; only a CUDA run gains.
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def device_batches(
        self, dataset: TensorDataset, shuffle: bool, batch_size: int, device: torch.device
    ) -> DeviceBatches:
        """Cached features served from the device (moved there once per split and device)."""
        held = self._device_tensors
        entry = held.get(id(dataset))
        if entry is None or entry[0] is not dataset or entry[1].device != device:
            entry = held[id(dataset)] = (dataset, *(t.to(device, non_blocking=True) for t in dataset.tensors))
        epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        return DeviceBatches(entry[1], entry[2], batch_size, shuffle, self.seed, epoch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Train-time augmentation of a uint8 batch on the device (data.augment=true)."""
        raise NotImplementedError

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment uint8 images (training only), then run the trained model's preprocessing on them."""
        images, labels = batch
        if not holds_features(images):  # cached features go to the head as they are
            if self.trainer is None:
                raise RuntimeError("image batches are preprocessed by the trainer's model: attach a Trainer first")
            if self.augment and self.trainer.training:
                images = self.augment_images(images)
            images = self.trainer.lightning_module.preprocess.to(images.device)(images)
        return images, labels
