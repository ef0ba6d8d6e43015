"""Any image file to model input: a Fashion-MNIST-like 28x28 uint8 tensor (grey, a light object on a
dark background, the object fitted into 28x28 keeping its aspect ratio: `load_image`), or a colour
square as the torchvision weights' transforms cut it (`load_rgb`: folders of your own images).

Safety: images larger than Pillow's decompression-bomb limit are refused from their header, before
any pixel is decoded, and EPS (which Pillow would hand to Ghostscript) is not among the formats opened.
"""

from __future__ import annotations

import glob
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from fmnist_tl.core import FmnistError

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
    """A file that cannot be turned into model input; the message is the reason shown to the user."""


def open_image(path: Path, draft_side: int = WORKING_SIDE) -> Image.Image:
    """Open and decode one image (first frame, EXIF orientation applied) with bounded memory.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) when both sides stay at least
    `draft_side` pixels: the IDCT itself skips the detail a smaller output would lose.
    """
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
        image.draft(None, (draft_side, draft_side))  # JPEG only (see above)
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
        else:  # 32-bit int or float: the smallest usual range that holds the data ([0, 1] for float only)
            peak = float(values.max(initial=0.0))
            ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
            scale = next((s for s in ranges if peak <= s), peak)
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


def _open(path: str | os.PathLike, draft_side: int = WORKING_SIDE) -> Image.Image:
    """open_image, with the file system's refusals as BadImage too."""
    try:
        return open_image(Path(path), draft_side)
    except FileNotFoundError as e:
        raise BadImage("no such file") from e
    except IsADirectoryError as e:
        raise BadImage("is a directory") from e
    except PermissionError as e:
        raise BadImage("permission denied") from e


def load_image(path: str | os.PathLike, invert: str = "auto") -> torch.Tensor:
    """One file -> uint8 tensor (1, 28, 28) in the Fashion-MNIST convention; raises BadImage."""
    if invert not in ("auto", "yes", "no"):
        raise FmnistError(f"invert={invert!r} must be auto, yes or no")
    with _open(path) as image:  # closes the file (animations keep it open until then)
        return torch.from_numpy(to_fashion_mnist(image, invert)).unsqueeze(0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded Pillow image as 8-bit RGB: transparency composited on white, grey replicated,
    16-bit and float grey scaled to 8 bits (as `grey_and_alpha` reads them)."""
    if image.mode in HIGH_BIT_MODES:
        grey, _ = grey_and_alpha(image)
        return Image.fromarray(np.rint(grey * 255.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise BadImage(f"unsupported image mode {image.mode}") from e


def load_rgb(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One file -> uint8 tensor (3, size, size), cut as the torchvision weights' transforms cut it:
    the shorter side resized to `size` (bilinear, antialiased), then the centre square; EXIF
    orientation applied, transparency on white. Raises BadImage (unreadable, truncated, not an
    image, over the decompression-bomb limit: refused from the header)."""
    with _open(path, draft_side=int(size)) as image:
        try:
            rgb = to_rgb(image)
            # torchvision's own functions on the PIL image: the weights' transforms, bit for bit.
            rgb = TF.center_crop(TF.resize(rgb, int(size), interpolation=TF.InterpolationMode.BILINEAR), int(size))
        except DECODE_ERRORS as e:
            raise BadImage(f"truncated or corrupt image data ({type(e).__name__}: {e})") from e
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy())


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
