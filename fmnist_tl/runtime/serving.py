"""A trained classifier as one uint8-in, logits-out module, and that module run by ONNX Runtime.

`export` writes `UInt8Classifier` to a file. `demo` runs it in ONNX Runtime on CPU (`OnnxClassifier`):
for one image at a time ONNX Runtime's fused, pre-packed convolutions beat PyTorch's eager ones, and a
page is judged by how fast one image comes back. Both take the images predict loads (the model's
`input_spec`) and run the model's own preprocessing inside, so there is no second preprocessing.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from fmnist_tl.core import FmnistError
from fmnist_tl.features import export_onnx, session
from fmnist_tl.training import TransferClassifier


def channels_last_input(model: TransferClassifier) -> bool:
    """Whether the export takes (N, H, W, C), as a decoded photo is held, rather than the loaders' (N, C, H, W)."""
    return model.input_spec["kind"] != "fashion_mnist"


def export_layout(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    """The datamodule's uint8 (N, C, H, W) images in the layout the exported model takes."""
    return images.permute(0, 2, 3, 1).contiguous() if channels_last_input(model) else images


class UInt8Classifier(nn.Module):
    """uint8 images in the export's layout (`export_layout`) -> logits (N, C): the model's preprocessing,
    backbone and head in one graph."""

    def __init__(self, model: TransferClassifier) -> None:
        super().__init__()
        self.channels_last_input = channels_last_input(model)
        self.preprocess = copy.deepcopy(model.preprocess).cpu()
        # Plain (NCHW-contiguous) float32 CPU copies: channels_last and half precision are speed
        # tricks of a device, not part of the model.
        self.backbone = copy.deepcopy(model.backbone).float().cpu().to(memory_format=torch.contiguous_format).eval()
        self.head = copy.deepcopy(model.head).float().cpu().eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            images = images.permute(0, 3, 1, 2)
        return self.head(self.backbone(self.preprocess(images)))


class OnnxClassifier:
    """uint8 (B, C, H, W) as `model.input_spec` -> class probabilities (B, classes), as predict's
    `classify` computes them, run by ONNX Runtime on CPU.

    The model is exported once, in memory, and checked on `check_images` against PyTorch: a logit
    further off than float32 rounding explains is refused (FmnistError), so a caller can fall back.
    """

    def __init__(self, model: TransferClassifier, check_images: torch.Tensor) -> None:
        self.model = model  # its input_spec says the layout the graph takes (export_layout)
        module = UInt8Classifier(model).eval()
        with tempfile.TemporaryDirectory(prefix="fmnist-onnx-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(module, export_layout(model, check_images[:2]), path, what="the ONNX Runtime forward pass")
            self.session = session(path)  # holds the graph in memory; the file may go
        with torch.inference_mode():
            reference = module(export_layout(model, check_images)).float()
        off = (self.logits(check_images) - reference).abs().max().item()
        tolerance = 1e-3 * (1 + reference.abs().max().item())
        if not off <= tolerance:
            raise FmnistError(
                f"ONNX Runtime's logits differ from PyTorch's by {off:.3g} (more than {tolerance:.3g}) on "
                f"{len(check_images)} images; run it with PyTorch instead"
            )
        self.max_abs_logit_diff = off

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = export_layout(self.model, images.cpu()).contiguous()
        return torch.from_numpy(self.session.run(["logits"], {"images": x.numpy()})[0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).float().softmax(-1)
