"""Classify your own images with a trained checkpoint.

    python -m fmnist_tl.predict --checkpoint CKPT [--top-k 3] [--format table|json|csv]
                                [--invert auto|yes|no] PATH...

PATH is a file, a folder (its image files, recursively, sorted) or a glob. Each image is brought
to the Fashion-MNIST convention -- grey, a light object on a dark background, the object fitted
into 28x28 keeping its aspect ratio -- and then through the model's own preprocessing.

A file that cannot be read costs one line on stderr naming it and the reason; the others are still
predicted, in input order, and the exit code is 1 (0 when every file was predicted, 2 for a bad
checkpoint or arguments). From code: `fmnist_tl.predict.predict(paths, checkpoint)`.

Safety: the model is rebuilt from the checkpoint's stored hyper-parameters and only its tensors
are loaded (`weights_only=True`), so a checkpoint cannot run code. Images larger than Pillow's
decompression-bomb limit are refused from their header, before any pixel is decoded, and EPS
(which Pillow would hand to Ghostscript) is not among the formats opened.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from fmnist_tl.data import CLASS_NAMES
from fmnist_tl.model import TransferClassifier
from fmnist_tl.utils import FmnistError, exit_on_user_error

SIZE = 28
# Work on at most this many pixels per side before trimming and fitting into 28x28; large photos
# are reduced first (JPEGs already while decoding), so memory stays bounded.
WORKING_SIDE = 1024
# Border median above this (0..1, after compositing) means "photo on a light background": invert.
LIGHT_BORDER = 0.5
# After inversion and levelling, pixels above this belong to the object (used to trim margins).
OBJECT_LEVEL = 0.1
HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Every format Pillow reads except EPS, which Pillow decodes by running Ghostscript on the file.
Image.init()
SAFE_FORMATS = tuple(f for f in Image.ID if f != "EPS")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in SAFE_FORMATS)
# What Pillow raises on damaged files: truncated data, broken chunks, bad headers, zlib errors.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class BadImage(Exception):
    """A file that cannot be turned into a 28x28 image; the message is the reason shown to the user."""


@dataclass
class Prediction:
    """One input file: its top-k (class name, probability), best first, or why it failed."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> float | None:
        return self.top[0][1] if self.top else None


# ---------------------------------------------------------------------------------------------
# Reading any image into the Fashion-MNIST convention


def open_image(path: Path) -> Image.Image:
    """Open and decode one image (first frame, EXIF orientation applied) with bounded memory."""
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; refuse anything over it, before decoding.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=SAFE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"refused, over Pillow's decompression-bomb limit ({e})") from e
        except UnidentifiedImageError as e:
            raise BadImage("not an image file Pillow can read") from e
        except DECODE_ERRORS as e:
            raise BadImage(f"corrupt image header ({type(e).__name__}: {e})") from e
    try:
        image.seek(0)  # animations: the first frame
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale when the photo is much larger than needed.
        image.draft(None, (WORKING_SIDE, WORKING_SIDE))
        ImageOps.exif_transpose(image, in_place=True)  # loads the pixels; truncated data fails here
        return image
    except DECODE_ERRORS as e:
        image.close()
        raise BadImage(f"truncated or corrupt image data ({type(e).__name__}: {e})") from e


def _reduce(image: Image.Image) -> Image.Image:
    if max(image.size) > WORKING_SIDE:
        image = image.copy()
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.LANCZOS)
    return image


def grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey levels in [0, 1] (float32, H x W) and the alpha channel in [0, 1] if the image has one."""
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16"):
            scale = 65535.0  # 16-bit grey: scaled to [0, 1], not clamped to white
        else:  # 32-bit int or float: guess the range from the data
            peak = float(values.max(initial=0.0))
            if image.mode == "F" and peak <= 1.0:
                scale = 1.0
            else:
                scale = next((s for s in (255.0, 65535.0) if peak <= s), peak)
        grey = Image.fromarray(np.clip(values / scale, 0.0, 1.0).astype(np.float32), mode="F")
        return np.asarray(_reduce(grey), dtype=np.float32), None
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        # Palette or grey transparency becomes a real alpha channel; Pillow resizes LA premultiplied.
        la = _reduce(image.convert("RGBA").convert("LA"))
        values = np.asarray(la, dtype=np.float32) / 255.0
        return values[..., 0], values[..., 1]
    try:
        grey = image.convert("L")
    except ValueError:
        try:
            grey = image.convert("RGB").convert("L")
        except ValueError as e:
            raise BadImage(f"unsupported image mode {image.mode}") from e
    return np.asarray(_reduce(grey), dtype=np.float32) / 255.0, None


def composite(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Put a transparent image on the background that contrasts with its object.

    Dropping alpha would leave whatever colour the transparent pixels happen to store (often
    black, hiding a dark object). A dark object goes on white (auto-invert then makes it light on
    black), a light object goes on black.
    """
    coverage = float(alpha.sum())
    object_level = float((grey * alpha).sum()) / coverage if coverage > 0 else 1.0
    background = 1.0 if object_level < 0.5 else 0.0
    return grey * alpha + background * (1.0 - alpha)


def border_level(grey: np.ndarray) -> float:
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    return float(np.median(border))


def fit_into_square(grey: np.ndarray, background: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Trim the background margins, scale the longest side to `size` (antialiased), centre on background."""
    rows, cols = np.nonzero(np.abs(grey - background) > OBJECT_LEVEL)
    if len(rows):
        grey = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = grey.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F").resize(
        (new_w, new_h), Image.Resampling.LANCZOS
    )
    canvas = np.full((size, size), background, dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = np.clip(np.asarray(resized), 0.0, 1.0)
    return canvas


def to_fashion_mnist(image: Image.Image, invert: str = "auto") -> np.ndarray:
    """Any decoded Pillow image -> uint8 (28, 28): grey, light object on a dark background."""
    grey, alpha = grey_and_alpha(image)
    if alpha is not None:
        grey = composite(grey, alpha)
    if invert == "yes" or (invert == "auto" and border_level(grey) > LIGHT_BORDER):
        grey = 1.0 - grey
    if grey.shape != (SIZE, SIZE):  # a 28x28 image is taken as framed like Fashion-MNIST already
        background = border_level(grey)
        if background < LIGHT_BORDER:
            # Fashion-MNIST backgrounds are black: a photo's grey background is levelled down to 0.
            grey = np.clip((grey - background) / (1.0 - background), 0.0, 1.0)
            background = 0.0
        grey = fit_into_square(grey, background)
    return np.rint(grey * 255.0).astype(np.uint8)


def load_image(path: str | os.PathLike, invert: str = "auto") -> torch.Tensor:
    """One file -> uint8 tensor (1, 28, 28) in the Fashion-MNIST convention; raises BadImage."""
    if invert not in ("auto", "yes", "no"):
        raise FmnistError(f"invert={invert!r} must be auto, yes or no")
    try:
        image = open_image(Path(path))
    except FileNotFoundError as e:
        raise BadImage("no such file") from e
    except IsADirectoryError as e:
        raise BadImage("is a directory") from e
    except PermissionError as e:
        raise BadImage("permission denied") from e
    with image:  # closes the file (animations keep it open until then)
        return torch.from_numpy(to_fashion_mnist(image, invert)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Inputs: files, folders and globs, in the order given


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str | None]]:
    """(path, error or None) for every file named by the inputs, keeping the input order."""
    out: list[tuple[str, str | None]] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            out += [(str(p), None) for p in found] or [(text, "folder holds no image files")]
        elif path.exists() or path.is_symlink():
            out.append((text, None))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                out.append((text, "no file matches this pattern"))
            for match in matches:
                out += expand_inputs([match]) if Path(match).is_dir() else [(match, None)]
        else:
            out.append((text, "no such file or directory"))
    return out


# ---------------------------------------------------------------------------------------------
# Prediction


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FmnistError(f"--device {device}: no CUDA device here; use --device cpu")
    return torch.device(device)


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> TransferClassifier:
    """The model from our checkpoint alone: stored hyper-parameters, tensors via weights_only=True."""
    return TransferClassifier.from_checkpoint(checkpoint).to(device).eval()


@torch.inference_mode()
def classify(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 28, 28) -> class probabilities (B, C), through the model's own preprocessing."""
    device = next(model.parameters()).device
    return model(model.preprocess(images.to(device))).float().softmax(-1).cpu()


def iter_predictions(
    inputs: Sequence[str | os.PathLike],
    model: TransferClassifier,
    top_k: int = 3,
    invert: str = "auto",
    batch_size: int = 64,
    class_names: Sequence[str] | None = None,
) -> Iterator[Prediction]:
    """Predictions in input order, `batch_size` files at a time (images are loaded per batch)."""
    names = tuple(class_names or CLASS_NAMES)
    if not 1 <= top_k <= len(names):
        raise FmnistError(f"top_k={top_k} must be between 1 and {len(names)}")
    if batch_size < 1:
        raise FmnistError(f"batch_size={batch_size} must be >= 1")
    files = expand_inputs(inputs)
    for start in range(0, len(files), batch_size):
        chunk = [Prediction(path, error=error) for path, error in files[start : start + batch_size]]
        images, slots = [], []
        for slot, pred in enumerate(chunk):
            if pred.error is None:
                try:
                    images.append(load_image(pred.path, invert))
                    slots.append(slot)
                except BadImage as e:
                    pred.error = str(e)
        if images:
            probs = classify(model, torch.stack(images))
            values, indices = probs.topk(top_k, dim=-1)
            for slot, vals, idxs in zip(slots, values.tolist(), indices.tolist(), strict=True):
                chunk[slot].top = [(names[i], v) for i, v in zip(idxs, vals, strict=True)]
        yield from chunk


def predict(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    model: TransferClassifier | None = None,
    top_k: int = 3,
    invert: str = "auto",
    batch_size: int = 64,
    device: str = "cpu",
) -> list[Prediction]:
    """Classify image files, folders or globs; one Prediction per file, in input order.

    Pass either `checkpoint` (a .ckpt written by train) or an already loaded `model`. Files that
    cannot be read come back with `error` set instead of raising.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if model is None:
        if checkpoint is None:
            raise FmnistError("predict: pass checkpoint=PATH or model=TransferClassifier")
        model = load_model(checkpoint, resolve_device(device))
    return list(iter_predictions(inputs, model, top_k, invert, batch_size))


# ---------------------------------------------------------------------------------------------
# Command line


def format_json(predictions: list[Prediction]) -> str:
    rows = [
        {
            "path": p.path,
            "label": p.label,
            "probability": p.probability,
            "top_k": [{"label": name, "probability": prob} for name, prob in p.top],
        }
        for p in predictions
    ]
    return json.dumps(rows, indent=2)


def format_csv(predictions: list[Prediction], top_k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path"] + [f"{col}_{rank}" for rank in range(1, top_k + 1) for col in ("label", "probability")])
    for p in predictions:
        writer.writerow([p.path] + [x for name, prob in p.top for x in (name, f"{prob:.6f}")])
    return buf.getvalue()


def print_table(predictions: list[Prediction], top_k: int, console: Console) -> None:
    table = Table(show_edge=False, header_style="bold")
    table.add_column("file", overflow="fold")
    table.add_column("prediction")
    table.add_column("p", justify="right")
    ordinals = {2: "2nd", 3: "3rd"}
    for rank in range(2, top_k + 1):
        table.add_column(ordinals.get(rank, f"{rank}th"))
    for p in predictions:
        label, prob = p.top[0]
        others = [f"{name} {value:.2f}" for name, value in p.top[1:]]
        table.add_row(p.path, label, f"{prob:.2f}", *others)
    console.print(table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_tl.predict",
        description="Classify images (files, folders, globs) with a fmnist_tl checkpoint.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", "-c", required=True, help="a .ckpt written by fmnist_tl.train")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default 3)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    parser.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="make the object light on dark: auto inverts images whose border is light (default)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_model(args.checkpoint, resolve_device(args.device))
    succeeded, failed = [], 0
    for pred in iter_predictions(args.paths, model, args.top_k, args.invert, args.batch_size):
        if pred.ok:
            succeeded.append(pred)
        else:
            failed += 1
            print(f"{pred.path}: {pred.error}", file=sys.stderr, flush=True)
    if args.format == "json":
        sys.stdout.write(format_json(succeeded) + "\n")
    elif args.format == "csv":
        sys.stdout.write(format_csv(succeeded, args.top_k))
    elif succeeded:
        # Piped output has no terminal width; do not fold paths at rich's default of 80 columns.
        print_table(succeeded, args.top_k, Console(width=None if sys.stdout.isatty() else 200))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_user_error():
        code = run(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
