"""Classify your own images with a trained checkpoint (docs/evaluation.md has the details).

    python -m fmnist_tl.predict --checkpoint CKPT [--top-k 3] [--format table|json|csv]
                                [--invert auto|yes|no] PATH...

PATH is a file, a folder (its image files, recursively, sorted) or a glob. Each image goes through the
preprocessing of the data the checkpoint was trained on (its `input_spec`): a Fashion-MNIST model gets
the 28x28 Fashion-MNIST convention (fmnist_tl.data.load_image, with --invert), a model trained on a
folder of images gets RGB at its stored size (fmnist_tl.data.load_rgb). The class names come from the
checkpoint. A file that cannot be read costs one line on stderr and
exit code 1, the others are still predicted, in input order (exit 2: bad checkpoint or arguments).
The model is rebuilt from the checkpoint's hyper-parameters and only its tensors are loaded
(`weights_only=True`), so a checkpoint cannot run code. From code: `predict(paths, checkpoint)`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from fmnist_tl.core import FmnistError
from fmnist_tl.data import BadImage, expand_inputs, load_image, load_rgb
from fmnist_tl.runtime import task_wrapper
from fmnist_tl.training import TransferClassifier


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FmnistError(f"--device {device}: no CUDA device here; use --device cpu")
    return torch.device(device)


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> TransferClassifier:
    """The model from our checkpoint alone: stored hyper-parameters, tensors via weights_only=True."""
    return TransferClassifier.from_checkpoint(checkpoint).to(device).eval()


def image_loader(model: TransferClassifier, invert: str = "auto") -> Callable[[str], torch.Tensor]:
    """path -> the uint8 image the model was trained on (its input_spec); raises BadImage."""
    spec = model.input_spec
    if spec["kind"] == "fashion_mnist":
        return lambda path: load_image(path, invert)
    if invert != "auto":
        raise FmnistError(
            f"--invert {invert}: only Fashion-MNIST models take it; this one was trained on a folder of "
            "images, which predict reads as they are: drop --invert"
        )
    if spec["channels"] != 3 or spec["height"] != spec["width"]:
        raise FmnistError(f"the checkpoint's input_spec {spec} is not square RGB: predict cannot load images for it")
    return lambda path: load_rgb(path, spec["height"])


@torch.inference_mode()
def classify(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) as `model.input_spec` -> class probabilities (B, classes), through the model's
    own preprocessing."""
    device = next(model.parameters()).device
    return model(model.preprocess(images.to(device))).float().softmax(-1).cpu()


def resolve_top_k(top_k: int | None, model: TransferClassifier) -> int:
    """None: 3, or every class of a model with fewer; else checked against the model's classes."""
    count = len(model.class_names)
    if top_k is None:
        return min(3, count)
    if not 1 <= top_k <= count:
        raise FmnistError(f"top_k={top_k} must be between 1 and {count} (the model's classes)")
    return top_k


def iter_predictions(
    inputs: Sequence[str | os.PathLike],
    model: TransferClassifier,
    top_k: int | None = None,
    invert: str = "auto",
    batch_size: int = 64,
) -> Iterator[Prediction]:
    """Predictions in input order, `batch_size` files at a time (images are loaded per batch)."""
    class_names, top_k = model.class_names, resolve_top_k(top_k, model)
    if batch_size < 1:
        raise FmnistError(f"batch_size={batch_size} must be >= 1")
    load = image_loader(model, invert)
    files = expand_inputs(inputs)
    for start in range(0, len(files), batch_size):
        chunk = [Prediction(path, error=error) for path, error in files[start : start + batch_size]]
        images, slots = [], []
        for slot, pred in enumerate(chunk):
            if pred.error is None:
                try:
                    images.append(load(pred.path))
                    slots.append(slot)
                except BadImage as e:
                    pred.error = str(e)
        if images:
            probs = classify(model, torch.stack(images))
            values, indices = probs.topk(top_k, dim=-1)
            for slot, vals, idxs in zip(slots, values.tolist(), indices.tolist(), strict=True):
                chunk[slot].top = [(class_names[i], v) for i, v in zip(idxs, vals, strict=True)]
        yield from chunk


def predict(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    model: TransferClassifier | None = None,
    top_k: int | None = None,
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
    parser.add_argument(
        "--top-k", type=int, default=None, help="how many classes to show per image (default 3, at most the model's)"
    )
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    parser.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Fashion-MNIST models: make the object light on dark; auto inverts images whose border is light (default)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def refuse_overrides(paths: Sequence[str]) -> None:
    """A `key=value` carried over from a train or evaluate command is not an image: say so, once."""
    for arg in paths:
        found = re.fullmatch(r"[+~]*([A-Za-z_]\w*)(?:\.\w+)*=.*", arg)
        if found and not os.path.exists(arg):
            if found.group(1) == "model":
                raise FmnistError(
                    f"{arg}: predict takes the model from the checkpoint (--checkpoint), so it has no model.* "
                    "settings; drop that argument"
                )
            raise FmnistError(f"{arg}: predict takes no config overrides, only flags (see --help); drop that argument")


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_overrides(args.paths)
    model = load_model(args.checkpoint, resolve_device(args.device))
    top_k = resolve_top_k(args.top_k, model)
    succeeded, failed = [], 0
    for pred in iter_predictions(args.paths, model, top_k, args.invert, args.batch_size):
        if pred.ok:
            succeeded.append(pred)
        else:
            failed += 1
            print(f"{pred.path}: {pred.error}", file=sys.stderr, flush=True)
    if args.format == "json":
        sys.stdout.write(format_json(succeeded) + "\n")
    elif args.format == "csv":
        sys.stdout.write(format_csv(succeeded, top_k))
    elif succeeded:
        # Piped output has no terminal width; do not fold paths at rich's default of 80 columns.
        print_table(succeeded, top_k, Console(width=None if sys.stdout.isatty() else 200))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    with task_wrapper():
        code = run(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
