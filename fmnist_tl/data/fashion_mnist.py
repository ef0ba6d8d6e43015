"""Fashion-MNIST as a LightningDataModule.

The loaders move uint8 (B, 1, 28, 28) batches; augmentation, then the model's preprocessing
(`ImagePreprocess`: resizing to the backbone's input size, grey to 3 channels, normalisation) run
batched on the accelerator in `on_after_batch_transfer`, so the dataset is never materialised at the
backbone's input size. The model owns the preprocessing (its checkpoints carry it), so this module
holds no image size or normalisation of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.datasets import FashionMNIST

from fmnist_tl.config import one_of
from fmnist_tl.core import FmnistError
from fmnist_tl.data.raw_files import DEFAULT_SIZES, load_split, prepare_raw

CLASS_NAMES: tuple[str, ...] = tuple(FashionMNIST.classes)
# Every torchvision ImageNet weight normalises with these: the datamodule's default when used on its own
# (a model config leaves mean/std null and takes them from its weights' transforms, fmnist_tl/backbones/registry.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class ImagePreprocess(nn.Module):
    """uint8 (B, 1, 28, 28) -> normalised float (B, 3, S, S), batched on whatever device holds it.

    The model holds one (`TransferClassifier.preprocess`): training, the feature cache, prediction
    and export all run that one, so they preprocess exactly alike.
    """

    def __init__(
        self, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # antialias only matters when shrinking; upsampling 28 -> 224 is plain bilinear.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def augment_batch(images: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Per-sample random horizontal flip and a small integer translation of uint8 28x28 images."""
    b = images.shape[0]
    flip = torch.rand(b, device=images.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), device=images.device)
        dy = torch.randint(0, 2 * max_shift + 1, (b,), device=images.device)
        h, w = x.shape[-2:]
        # (b, h, w) index grids, broadcast: sample i's window starts at row dy[i], column dx[i].
        rows = dy.view(b, 1, 1) + torch.arange(h, device=images.device).view(1, h, 1)
        cols = dx.view(b, 1, 1) + torch.arange(w, device=images.device).view(1, 1, w)
        x = padded[torch.arange(b, device=images.device).view(b, 1, 1), 0, rows, cols].unsqueeze(1)
    return x


def holds_features(x: torch.Tensor) -> bool:
    """True when a split's tensor or a batch holds cached backbone features rather than images.

    The cached-features contract, in one place. Images are 4-D: uint8 (N, 1, 28, 28) in a split,
    float (B, 3, H, W) once preprocessed on the device. Pooled backbone features are 2-D (N, D).
    The feature cache (fmnist_tl.features.FeatureCache) swaps a split's images for its features
    with `FashionMNISTDataModule.use_cached_features`; from then on this test is what makes the
    datamodule skip preprocessing (and serve the split as whole-tensor batches), and what makes
    `TransferClassifier.logits` send the batch straight to the head.
    """
    return x.ndim == 2


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST's train split carved into train/val (seeded), and its test split, as uint8 images.

    Args:
        mirror_dir: a folder holding the IDX files, read before any download.
        expected_sizes: images per split the IDX files must hold (None: the real dataset's; a
            split set to None is not checked).
        cache_features: the `data` group's key, read from the config by
            `fmnist_tl.features.feature_cache_for`; accepted here so the group instantiates as is.
    """

    def __init__(
        self,
        data_dir: str = "data",
        mirror_dir: str | None = None,
        val_size: int = 5000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        augment: bool = False,
        train_subset: int | None = None,
        test_subset: int | None = None,
        expected_sizes: dict[str, int] | None = None,
        download: bool = True,
        seed: int = 42,
        cache_features: str | bool = "auto",
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.mirror_dir = mirror_dir
        self.val_size = int(val_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        one_of("auto", True, False)("data.pin_memory", pin_memory)  # the schema's rule, for Python callers
        self.pin_memory = pin_memory
        self.augment = bool(augment)
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.expected_sizes = DEFAULT_SIZES if expected_sizes is None else dict(expected_sizes)
        self.download = download
        self.seed = int(seed)
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        # id(dataset) -> (dataset, features, labels) on the device, for DeviceBatches (cached features).
        self._device_tensors: dict[int, tuple] = {}

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "FashionMNIST" / "raw"

    def prepare_data(self) -> None:
        """Put validated IDX files in raw/: from the local mirror first, else torchvision's download."""
        prepare_raw(self.raw_dir, self.mirror_dir, self.download, self.expected_sizes)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        train_x, train_y = load_split(self.raw_dir, "train", self.expected_sizes.get("train"))
        test_x, test_y = load_split(self.raw_dir, "test", self.expected_sizes.get("test"))
        g = torch.Generator().manual_seed(self.seed)
        if self.train_subset:
            keep = torch.randperm(len(train_x), generator=g)[: int(self.train_subset)]
            train_x, train_y = train_x[keep], train_y[keep]
        if self.test_subset:
            test_x, test_y = test_x[: int(self.test_subset)], test_y[: int(self.test_subset)]
        if not 0 < self.val_size < len(train_x):
            raise FmnistError(f"data.val_size={self.val_size} must be between 1 and {len(train_x) - 1}")
        perm = torch.randperm(len(train_x), generator=g)
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        self.data_train = TensorDataset(train_x[train_idx].unsqueeze(1), train_y[train_idx])
        self.data_val = TensorDataset(train_x[val_idx].unsqueeze(1), train_y[val_idx])
        self.data_test = TensorDataset(test_x.unsqueeze(1), test_y)
        # The uint8 images stay reachable when a split is swapped for cached features (reports need them).
        self.image_splits = {s: getattr(self, f"data_{s}").tensors for s in ("train", "val", "test")}

    # --- cached features (see holds_features) -------------------------------------------------
    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (N,1,28,28) or cached features (N,D), labels) of train/val/test after setup."""
        dataset = getattr(self, f"data_{split}", None)
        if not isinstance(dataset, TensorDataset):
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

    def split_info(self) -> dict:
        """How the splits were carved, recorded in feature-cache manifests for people reading them."""
        return {
            "raw_dir": str(self.raw_dir),
            "val_size": self.val_size,
            "split_seed": self.seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
        }

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

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment uint8 images (training only), then run the trained model's preprocessing on them."""
        images, labels = batch
        if not holds_features(images):  # cached features go to the head as they are
            if self.trainer is None:
                raise RuntimeError("image batches are preprocessed by the trainer's model: attach a Trainer first")
            if self.augment and self.trainer.training:
                images = augment_batch(images)
            images = self.trainer.lightning_module.preprocess.to(images.device)(images)
        return images, labels
