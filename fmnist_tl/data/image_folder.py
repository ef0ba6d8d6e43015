"""Any folder of labelled images as a LightningDataModule (`data=image_folder data.root=DIR`).

Layouts: torchvision's ImageFolder layout (one subfolder per class, any file Pillow reads, colour or
grey, any size), or DIR/train, DIR/val, DIR/test each in that layout (val and test optional). A
missing val or test split is drawn from train, stratified per class and seeded (`data.val_size`,
`data.test_size`: a fraction or a count). Class names are the class folders' names, sorted.

Images are decoded once into a uint8 store on disk at `data.stored_size`
(fmnist_tl.data.image_store); a split is a view of rows of it (`StoredRows`), read batch by batch,
so memory stays bounded however many images there are. From there everything runs as for
Fashion-MNIST (fmnist_tl.data.splits): the loaders, the feature cache (keyed by the store,
`split_fingerprint`), and the model's own preprocessing on the device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

from fmnist_tl.config import fraction_or_count
from fmnist_tl.core import FmnistError, atomic_write_text
from fmnist_tl.data.image_store import ImageStore, StoredRows, StoredSplit, open_or_build
from fmnist_tl.data.images import IMAGE_EXTENSIONS
from fmnist_tl.data.splits import SplitsDataModule

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
SKIPPED_LIST = "skipped_files.txt"


# ---------------------------------------------------------------------------------------------
# The folder


def class_files(folder: Path) -> tuple[list[str], dict[str, list[str]], int]:
    """(sorted class names, {class: its image files relative to `folder`}, files ignored).

    Files are found recursively (as torchvision's ImageFolder does); hidden files and files whose
    extension no image format uses are ignored.
    """
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    found, ignored = {}, 0
    for name in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.startswith("."):
                    continue
                if Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                files.append(str((Path(dirpath) / f).relative_to(folder / name)))
        if not files:
            raise FmnistError(
                f"class folder {folder / name} holds no image files: add images to it or remove the folder"
            )
        found[name] = files
    return classes, found, ignored


def scan(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """(class names, {split folder: [(file relative to root, label)]}) for the layouts above.

    A split's files are ordered by their path inside the class folder, then class: a split written
    out with numbered file names (as the tests write Fashion-MNIST) keeps its order.
    """
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FmnistError(
            f"data.root={root} {what}: point it at a folder with one subfolder of images per class "
            "(or train/, val/ and test/ folders holding those)"
        )
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    train = root / "train"
    split_layout = "train" in subdirs and any(e.is_dir() for e in os.scandir(train))
    if split_layout:
        others = [d for d in subdirs if d not in SPLITS]
        if others:
            raise FmnistError(
                f"data.root={root} holds train/ beside other folders ({', '.join(others)}): keep only "
                "train/, val/ and test/ there, or only class folders"
            )
        folders = {s: root / s for s in SPLITS if s in subdirs}
    else:
        if "val" in subdirs or "test" in subdirs:
            raise FmnistError(
                f"data.root={root} has val/ or test/ but no train/ with class folders: add {train}/<class>/ "
                "or rename the folders"
            )
        folders = {"train": root}
    classes: list[str] | None = None
    files: dict[str, list[tuple[str, int]]] = {}
    ignored = 0
    for split, folder in folders.items():
        names, found, skipped = class_files(folder)
        ignored += skipped
        if classes is None:
            classes = names
            if len(classes) < 2:
                shown = f"one class folder ({classes[0]})" if classes else "no class folders"
                raise FmnistError(
                    f"{folder} holds {shown}: a classifier needs at least 2 classes, one subfolder of images each"
                )
        elif names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            diff = [f"missing {', '.join(missing)}"] if missing else []
            diff += [f"extra {', '.join(extra)}"] if extra else []
            raise FmnistError(
                f"{folder}'s class folders differ from {folders['train']}'s ({'; '.join(diff)}): "
                "every split needs the same class folders"
            )
        rows = [
            (str((folder / c / f).relative_to(root)), label, f) for label, c in enumerate(classes) for f in found[c]
        ]
        rows.sort(key=lambda r: (r[2], r[1]))
        files[split] = [(rel, label) for rel, label, _ in rows]
    if ignored:
        log.warning("%s: ignored %d files whose extension is not an image format's", root, ignored)
    return tuple(classes or ()), files


def per_class_counts(sizes: Sequence[int], value: float | int) -> list[int]:
    """How many images of each class a drawn split takes: a fraction of each class (rounded), or a
    count shared in proportion to the class sizes (largest remainder)."""
    if isinstance(value, float):
        return [math.floor(value * n + 0.5) for n in sizes]
    total = sum(sizes)
    quotas = [value * n / total for n in sizes]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: int(value) - sum(counts)]:
        counts[i] += 1
    return counts


def draw_splits(
    labels: torch.Tensor, sizes: dict[str, float | int], seed: int, classes: Sequence[str], root: Path
) -> dict[str, torch.Tensor]:
    """Positions in `labels` (the train folder's) of each drawn split and of what is left for
    training ("train"), stratified per class and seeded; each split's share is counted on the
    whole train folder (`per_class_counts`). Every class must keep an image in every split."""
    class_sizes = [int((labels == c).sum()) for c in range(len(classes))]
    counts = {split: per_class_counts(class_sizes, value) for split, value in sizes.items()}
    g = torch.Generator().manual_seed(int(seed))
    owner = torch.full((len(labels),), -1)  # index into `sizes` of the split a position went to, -1: train
    for c, n in enumerate(class_sizes):
        taken = [counts[split][c] for split in sizes]
        for split, k in zip(sizes, taken, strict=True):
            if k == 0:
                raise FmnistError(
                    f"data.{split}_size={sizes[split]} leaves class '{classes[c]}' ({n} images) with no "
                    f"{SPLIT_NAMES[split]} image: change data.{split}_size, add images to that class, or give "
                    f"the split its own folder ({root / split}/<class>/)"
                )
        if sum(taken) >= n:
            asked = " and ".join(f"data.{split}_size={value}" for split, value in sizes.items())
            raise FmnistError(
                f"{asked} leave class '{classes[c]}' ({n} images) with no training image: lower them "
                "or add images to that class"
            )
        positions = torch.nonzero(labels == c).flatten()
        order = positions[torch.randperm(n, generator=g)]
        start = 0
        for i, k in enumerate(taken):
            owner[order[start : start + k]] = i
            start += k
    drawn = {split: torch.nonzero(owner == i).flatten() for i, split in enumerate(sizes)}
    return {**drawn, "train": torch.nonzero(owner == -1).flatten()}


def weights_crop_size(backbone: str, weights: str | None) -> int:
    """The crop size of the backbone weights' own transforms (the default model.image_size; a weights
    file is taken as the architecture's default weights, as fmnist_tl.backbones does)."""
    enum = torchvision.models.get_model_weights(backbone)
    meta = enum[weights] if weights in enum.__members__ else enum.DEFAULT
    return int(meta.transforms().crop_size[0])


def random_resized_crop_flip(
    images: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """torchvision's RandomResizedCrop (same scale and ratio ranges) and a horizontal flip, per sample,
    batched on the images' device; output at the input size, float in [0, 255].

    A box whose sampled side exceeds the image is clipped to it (torchvision redraws up to 10 times,
    then falls back to a centre crop); the crop is resized bilinearly (grid_sample).
    """
    b, device = images.shape[0], images.device
    area = torch.empty(b, device=device).uniform_(*scale)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # box sides as fractions of the image side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, device=device) * (1 - w) + w / 2) * 2 - 1  # box centres in [-1, 1]
    cy = (torch.rand(b, device=device) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------


class ImageFolderDataModule(SplitsDataModule):
    """A folder of labelled images (see the module docstring); `data=image_folder data.root=DIR`."""

    def __init__(
        self,
        root: str,
        stored_size: int | None = None,
        backbone: str | None = None,
        weights: str | None = None,
        val_size: float | int = 0.1,
        test_size: float | int = 0.1,
        on_bad_file: str = "error",
        cache_dir: str = "cache/images",
        run_dir: str | None = None,
        decode_workers: int | None = None,
        progress: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        augment: bool = False,
        seed: int = 42,
        cache_features: str | bool = "auto",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, augment, seed, cache_features)
        for key, value in (("val_size", val_size), ("test_size", test_size)):
            fraction_or_count(f"data.{key}", value)
        if on_bad_file not in ("error", "skip"):
            raise FmnistError(f"data.on_bad_file={on_bad_file!r} must be error or skip")
        self.root = Path(root).expanduser()
        self.stored_size = stored_size
        self.backbone, self.weights = backbone, weights
        self.val_size, self.test_size = val_size, test_size
        self.on_bad_file = on_bad_file
        self.cache_dir = Path(cache_dir)
        self.run_dir = Path(run_dir) if run_dir else None
        self.decode_workers = decode_workers
        self.progress = progress
        self.store: ImageStore | None = None
        self._files: dict[str, list[tuple[str, int]]] | None = None
        self.class_names: tuple[str, ...] = ()

    # --- the stored size and the store -------------------------------------------------------
    def follow(self, model: Any) -> None:
        spec = getattr(model, "input_spec", None)
        if self.stored_size is None and isinstance(spec, dict) and spec.get("kind") == "image_folder":
            self.stored_size = int(spec["height"])

    def size(self) -> int:
        """data.stored_size, else the model's input size: the trained model's (evaluate, export),
        else model.image_size or the backbone weights' crop size (train)."""
        if self.stored_size is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            spec = getattr(model, "input_spec", None) if model is not None else None
            if isinstance(spec, dict) and spec.get("kind") == "image_folder":
                self.stored_size = int(spec["height"])
            elif model is not None and hasattr(model, "preprocess"):
                self.stored_size = int(model.preprocess.image_size)
            elif self.backbone:
                self.stored_size = weights_crop_size(self.backbone, self.weights)
            else:
                raise FmnistError(
                    "data.stored_size is not set and no model says it: set data.stored_size "
                    "(the side the images were stored at when the model was trained)"
                )
        return int(self.stored_size)

    def _scan(self) -> dict[str, list[tuple[str, int]]]:
        if self._files is None:
            self.class_names, self._files = scan(self.root)
        return self._files

    def open_store(self) -> ImageStore:
        """The decoded store of every file under data.root (built on first use, then reopened)."""
        if self.store is None:
            files = [f for split in SPLITS for f in self._scan().get(split, [])]
            store = open_or_build(
                self.cache_dir,
                self.root,
                [rel for rel, _ in files],
                [label for _, label in files],
                self.size(),
                self.on_bad_file,
                self.decode_workers,
                self.progress,
            )
            if store.skipped:
                self._report_skipped(store)
            self.store = store
        return self.store

    def _report_skipped(self, store: ImageStore) -> None:
        lines = [f"{self.root / rel}\t{reason}" for rel, reason in store.skipped]
        where = ""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / SKIPPED_LIST, "\n".join(lines) + "\n")
            where = f", listed in {self.run_dir / SKIPPED_LIST}"
        log.warning(
            "Skipped %d unreadable image files (data.on_bad_file=skip)%s; first: %s", len(lines), where, lines[0]
        )

    def prepare_data(self) -> None:
        self.open_store()

    def setup(self, stage: str | None = None) -> None:
        self._scan()
        if self.data_train is not None:
            return
        files = self._scan()
        store = self.open_store()
        labels = torch.tensor([label for split in SPLITS for _, label in files.get(split, [])], dtype=torch.int64)
        valid = store.valid
        rows: dict[str, torch.Tensor] = {}
        start = 0
        for split in SPLITS:
            n = len(files.get(split, []))
            if split in files:
                span = torch.arange(start, start + n)
                rows[split] = span[valid[span]]
            start += n
        missing = {split: getattr(self, f"{split}_size") for split in ("val", "test") if split not in rows}
        if missing:
            train = rows["train"]
            drawn = draw_splits(labels[train], missing, self.seed, self.class_names, self.root)
            rows.update({split: train[positions] for split, positions in drawn.items()})
        for split in SPLITS:
            view = StoredRows(store, rows[split])
            setattr(self, f"data_{split}", StoredSplit(view, labels[rows[split]]))
        self.split_rows = rows
        # The uint8 images stay reachable when a split is swapped for cached features (reports need them).
        self.image_splits = {s: getattr(self, f"data_{s}").tensors for s in SPLITS}

    # --- what the rest of the project asks a datamodule ----------------------------------------
    def input_spec(self) -> dict[str, Any]:
        size = self.size()
        return {"kind": "image_folder", "channels": 3, "height": size, "width": size}

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        return random_resized_crop_flip(images)

    def split_fingerprint(self, split: str) -> str:
        """What identifies a split's images for the feature cache: the store's key (its files, their
        sizes and mtimes, the stored size) and the split's rows and labels; hashing the pixels
        themselves would read the whole store."""
        h = hashlib.sha256(f"image_folder|{self.open_store().key}|{split}|".encode())
        h.update(self.split_rows[split].numpy().tobytes())
        h.update(self.image_splits[split][1].numpy().tobytes())
        return h.hexdigest()

    def split_info(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "store": str(self.open_store().path),
            "stored_size": self.size(),
            "val_size": self.val_size,
            "test_size": self.test_size,
            "split_seed": self.seed,
            "skipped_files": len(self.open_store().skipped),
        }
