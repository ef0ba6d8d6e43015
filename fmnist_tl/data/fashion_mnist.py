"""Fashion-MNIST as a LightningDataModule.

The loaders (fmnist_tl.data.splits, shared with the image-folder datamodule) move uint8
(B, 1, 28, 28) batches; augmentation, then the model's preprocessing
(`ImagePreprocess`: resizing to the backbone's input size, grey to 3 channels, normalisation) run
batched on the accelerator in `on_after_batch_transfer`, so the dataset is never materialised at the
backbone's input size. The model owns the preprocessing (its checkpoints carry it), so this module
holds no image size or normalisation of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.datasets import FashionMNIST

from fmnist_tl.core import FmnistError
from fmnist_tl.data.raw_files import DEFAULT_SIZES, load_split, prepare_raw
from fmnist_tl.data.splits import (  # noqa: F401  (DeviceBatches, EpochShuffleSampler: imported from here too)
    DeviceBatches,
    EpochShuffleSampler,
    SplitsDataModule,
    holds_features,
)

CLASS_NAMES: tuple[str, ...] = tuple(FashionMNIST.classes)
# Every torchvision ImageNet weight normalises with these: the datamodule's default when used on its own
# (a model config leaves mean/std null and takes them from its weights' transforms, fmnist_tl/backbones/registry.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagePreprocess(nn.Module):
    """uint8 (B, 1 or 3, H, W) -> normalised float (B, 3, S, S), batched on whatever device holds it.

    Grey (Fashion-MNIST) is replicated to 3 channels; any size is resized to `image_size` (a folder's
    store is usually kept at it already, and then only normalised).

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


class FashionMNISTDataModule(SplitsDataModule):
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
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, augment, seed, cache_features)
        self.data_dir = Path(data_dir)
        self.mirror_dir = mirror_dir
        self.val_size = int(val_size)
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.expected_sizes = DEFAULT_SIZES if expected_sizes is None else dict(expected_sizes)
        self.download = download
        self.class_names = CLASS_NAMES

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

    def input_spec(self) -> dict[str, Any]:
        return {"kind": "fashion_mnist", "channels": 1, "height": 28, "width": 28}

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images)

    def split_info(self) -> dict:
        """How the splits were carved, recorded in feature-cache manifests for people reading them."""
        return {
            "raw_dir": str(self.raw_dir),
            "val_size": self.val_size,
            "split_seed": self.seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
        }
