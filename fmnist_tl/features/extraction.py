"""Running a frozen backbone once over a split: the settings, the fingerprint, the torch extractor.

- `extraction_settings` reads the `features` config group (declared by schemas.FeaturesConfig),
  checked once; `check_backend` refuses (backend, precision) pairs that cannot run, in one line.
- `split_entry` names one split's features by a fingerprint of everything that changes them, so
  the store (fmnist_tl.features.store) can tell a valid entry from a stale one.
- `FeatureExtractor` runs the backbone as fast as torch allows (autocast, channels_last, and
  `torch.compile` when the job repays it); whether it or ONNX Runtime's extractor runs, and in
  which precision, is measured on the machine by `fmnist_tl.features.probe`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fmnist_tl.backbones import backbone_identity
from fmnist_tl.config import FeaturesConfig, parse
from fmnist_tl.core import FmnistError, progress_bar, require_bf16, tensors_sha256
from fmnist_tl.features import onnx_backend
from fmnist_tl.features.manifest import fingerprint_key

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the meaning of a fingerprint field changes
PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def extraction_settings(cfg: DictConfig | dict | None) -> FeaturesConfig:
    """The `features` group as a FeaturesConfig, its keys, types and ranges checked by its schema
    (fmnist_tl/config/schemas.py) and its (backend, precision) pair by `check_backend`."""
    node = parse(FeaturesConfig, cfg, "features.", "conf/features/default.yaml")
    settings: FeaturesConfig = OmegaConf.to_object(node)
    check_backend(settings.backend, settings.precision)
    return settings


def check_backend(backend: str, precision: str, device: torch.device | None = None) -> None:
    """One-line errors for (backend, precision) settings that cannot run (here, when `device` is given)."""
    on_cuda = device is not None and device.type == "cuda"
    if precision == "bf16" and on_cuda:
        require_bf16("features.precision=bf16", "16, 32 or auto", device)
    if backend != "onnxruntime" and precision != "int8":
        return
    if backend == "torch":
        raise FmnistError("features.precision=int8 runs on onnxruntime: set features.backend=onnxruntime or auto")
    if precision in ("bf16", "16"):
        raise FmnistError(
            f"features.precision={precision} with features.backend=onnxruntime: ONNX Runtime's CPU kernels "
            "are fp32 and int8; use precision 32, int8 or auto, or features.backend=torch"
        )
    what = "features.backend=onnxruntime" if backend == "onnxruntime" else "features.precision=int8"
    onnx_backend.require_onnxruntime(what)
    if on_cuda:
        raise FmnistError(
            f"{what}: ONNX Runtime extraction (fp32/int8) runs on the CPU, but the trainer is on {device}; "
            "use features.backend=torch or auto on a GPU"
        )


def default_batch_size(device: torch.device) -> int:
    """features.batch_size=null: a GPU needs big batches to fill; on a CPU a small batch's activations stay in cache."""
    return 512 if device.type == "cuda" else 16


def work_at_224(n_images: int, image_size: int) -> float:
    """A job's size in 224-px image equivalents: a backbone's cost scales with pixels, so the thresholds
    (features.compile_min_images, features.probe_min_images) are counted in these."""
    return n_images * (image_size / 224) ** 2


def store_dtype_for(setting: str, precision: str) -> str:
    if setting != "auto":
        return setting
    # Features computed in bf16 are exactly representable in bf16; float16 keeps more mantissa otherwise.
    return "bfloat16" if precision == "bf16" else "float16"


# --------------------------------------------------------------------------------------------
# Fingerprints


def split_entry(
    backbone_name: str,
    weights_sha256: str,
    preprocess: nn.Module,
    precision: str,
    store_dtype: str,
    split: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    quantization: str | None = None,
    data_sha256: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(entry name, fingerprint) of one split's features; the name ends in the fingerprint's key.

    The fingerprint holds everything that changes the stored features. The device, compile and the
    backend do not (beyond float noise); an int8 model does, so int8 entries also hold its key
    (weights, calibration, settings). `data_sha256` identifies the split's images and labels when
    the datamodule knows them more cheaply than by hashing them (a folder's image store: its key).
    """
    fp = {
        "format": CACHE_FORMAT,
        **backbone_identity(backbone_name, weights_sha256, preprocess),
        "precision": precision,
        "store_dtype": store_dtype,
        "split": split,
        # The split's exact images and labels, after subset and train/val carving.
        "data_sha256": data_sha256 or tensors_sha256({"images": images, "labels": labels}),
        "count": len(labels),
    }
    if quantization is not None:
        fp["quantization"] = quantization
    tag = "-int8" if quantization else ""
    return f"{split}-{backbone_name}-{preprocess.image_size}px{tag}-{fingerprint_key(fp)}", fp


# --------------------------------------------------------------------------------------------
# The torch extractor


class FeatureExtractor:
    """Runs a frozen backbone over uint8 (N, 1, 28, 28) images in one fast pass.

    The compiled function is kept between calls, so train, val and test pay for one compile.
    """

    backend = "torch"

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: nn.Module,
        device: torch.device | str = "cpu",
        precision: str = "32",
        compile: bool | str = "auto",
        compile_min_images: int = 4000,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise FmnistError(f"features.precision={precision} must be one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.backbone = backbone.eval().to(self.device, memory_format=torch.channels_last)
        self.preprocess = preprocess.to(self.device)
        self.precision = precision
        self.compile = compile
        self.compile_min_images = int(compile_min_images)
        self.batch_size = int(batch_size or default_batch_size(self.device))
        self.progress = progress
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compiled_used = False  # set after a call: did it run the compiled function?

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def should_compile(self, n_images: int) -> bool:
        if self.compile in (True, False):
            return bool(self.compile)
        # Compiling is a fixed cost up front; it pays only once the eager time it saves clearly exceeds it.
        return work_at_224(n_images, self.preprocess.image_size) >= self.compile_min_images

    def __call__(self, images: torch.Tensor, description: str = "features") -> torch.Tensor:
        """uint8 (N, 1, 28, 28) on the CPU -> pooled features (N, D) float32 on the CPU."""
        if any(t.device != self.device for t in self.backbone.state_dict().values()):
            # Lightning moves the model back to the CPU at the end of fit, where the test stage's
            # extraction finds it. Moved outside inference mode: tensors made inside it would
            # be inference tensors, and loading the best checkpoint into them would fail.
            self.backbone.to(self.device)
        return self._extract(images, description)

    @torch.inference_mode()
    def _extract(self, images: torch.Tensor, description: str) -> torch.Tensor:
        n, bs = len(images), self.batch_size
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            images = images.pin_memory()  # lets the host-to-device copies overlap compute
        # Once compiled (a big split came first), smaller splits reuse it: the compile is paid for.
        use_compiled = self.should_compile(n) or self._compiled is not None
        if use_compiled and self._compiled is None:
            self._compiled = torch.compile(self._forward, dynamic=False)
        out: torch.Tensor | None = None
        self.compiled_used = False
        with progress_bar(self.progress) as bar, self._autocast(), torch._inductor.config.patch(freezing=True):
            task = bar.add_task(description, total=n)
            for start in range(0, n, bs):
                batch = images[start : start + bs].to(self.device, non_blocking=True)
                feats = self._run(batch, use_compiled)
                if out is None:
                    # Allocated outside the autograd-free tensors' world: a plain tensor the head can train on.
                    with torch.inference_mode(False):
                        out = torch.empty((n, feats.shape[1]), dtype=torch.float32, pin_memory=on_cuda)
                out[start : start + len(batch)].copy_(feats, non_blocking=True)
                bar.update(task, advance=len(batch))
        if on_cuda:
            torch.cuda.synchronize(self.device)
        if out is None:
            raise FmnistError(f"{description}: no images to extract features from")
        return out

    @torch.inference_mode()
    def run_eager(self, batch: torch.Tensor) -> torch.Tensor:
        """One eager batch (the probe times this), features back on the CPU."""
        with self._autocast():
            return self._forward(batch.to(self.device)).float().cpu()

    def _run(self, batch: torch.Tensor, use_compiled: bool) -> torch.Tensor:
        if not use_compiled or self._compiled is None:
            return self._forward(batch).float()
        # Pad the last batch to the full size: one static shape, no recompile.
        real = len(batch)
        if real < self.batch_size:
            pad = batch.new_zeros((self.batch_size - real, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
        try:
            feats = self._compiled(batch)
        except Exception as e:  # inductor/C++ toolchain problems surface at the first call
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile failed (%s: %s); extracting eagerly", type(e).__name__, first)
            self._compiled = None
            return self._forward(batch[:real]).float()
        self.compiled_used = True
        return feats[:real].float()
