"""A model trained on colour images with its own class names, made without a folder of images.

`ColourData` is the Fashion-MNIST datamodule's machinery (loaders, preprocessing on the device,
`image_splits`) serving uint8 (N, 3, S, S) colour images made in memory, and announcing itself as
`image_folder` data, as `ImageFolderDataModule` does: class names and `input_spec()`. So the consumers
of a checkpoint (report, predict, export) are tested on a colour model independently of the folder store.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import TensorDataset

from fmnist_tl.data.fashion_mnist import FashionMNISTDataModule
from fmnist_tl.training.model import TransferClassifier

CLASS_NAMES = ("red apple", "green leaf", "blue sky")
SIZE = 20
# The RGB colour each class's images are drawn around.
COLOURS = torch.tensor([[200, 40, 40], [40, 180, 60], [50, 80, 210]], dtype=torch.float32)


def colour_images(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, size, size) images and their labels: each a noisy field of its class's colour, with a
    darker square at a random place (so no two are alike), every class in turn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(COLOURS)
    base = COLOURS[labels].view(n, 3, 1, 1) + 60 * torch.randn(n, 3, size, size, generator=g)
    for i, (top, left) in enumerate(torch.randint(0, size // 2, (n, 2), generator=g).tolist()):
        base[i, :, top : top + size // 2, left : left + size // 2] *= 0.5
    return base.clamp(0, 255).round().to(torch.uint8), labels


class ColourData(FashionMNISTDataModule):
    """In-memory colour images that announce themselves as a folder of images (see the module docstring)."""

    def __init__(self, sizes: tuple[int, int, int] = (48, 12, 24), size: int = SIZE, batch_size: int = 16) -> None:
        super().__init__(data_dir="unused", val_size=sizes[1], batch_size=batch_size, cache_features=False)
        self.class_names = CLASS_NAMES
        self.sizes, self.size = sizes, size

    def input_spec(self) -> dict:
        return {"kind": "image_folder", "channels": 3, "height": self.size, "width": self.size}

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        for split, n, seed in zip(("train", "val", "test"), self.sizes, (1, 2, 3), strict=True):
            setattr(self, f"data_{split}", TensorDataset(*colour_images(n, seed, self.size)))
        self.image_splits = {s: getattr(self, f"data_{s}").tensors for s in ("train", "val", "test")}


def train_colour_checkpoint(folder: Path) -> Path:
    """A 2-epoch head run of resnet18 (random init, seeded: a head-only checkpoint) on ColourData at 32 px.

    model.num_classes stays at its default of 10: the model takes 3 from the data, as a folder run does.
    """
    L.seed_everything(0, verbose=False)
    model = TransferClassifier(
        backbone="resnet18",
        weights=None,
        image_size=32,
        init_seed=0,
        head={"hidden_dims": [32], "dropout": 0.0},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(model, datamodule=ColourData())
    path = folder / "colour.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return path
