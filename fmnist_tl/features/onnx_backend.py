"""ONNX Runtime extraction: the frozen backbone exported to ONNX, optionally int8 by static PTQ.

- `export_onnx` is the one torch -> ONNX export of the project (the export CLI uses it too).
- `backbone_onnx` / `int8_onnx` build the fp32 and the int8 model of a backbone and keep them in an
  `ArtefactStore` under the feature cache (fmnist_tl.features.manifest), so a warm run pays nothing
  and a truncated or foreign file is rebuilt, never run.
- int8 is `onnxruntime.quantization.quantize_static`, calibrated on training-split images only.
  `INT8_VARIANTS` are the settings the probe may try: 8-bit weights, and 7-bit ones (`reduce_range`)
  for x86 CPUs without VNNI, whose u8 x s8 kernel can saturate with full-range weights
  (docs/feature-cache.md). The probe's speed and fidelity gate choose, not CPU flags.
- `OnnxExtractor` runs a model over uint8 images; preprocessing (scale, resize, normalise) is
  inside the graph, so the whole extraction runs in ONNX Runtime's threads.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmnist_tl.core import FmnistError, progress_bar
from fmnist_tl.features.manifest import ManifestStore, fingerprint_key, manifest_head

log = logging.getLogger(__name__)

ARTEFACT_FORMAT = 1
OPSET = 18
# Per variant: quantize_static keyword settings, as plain JSON-able values (they go into cache keys).
INT8_VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": False},
    "int8-r7": {"activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": True},
}
QUANT_COMMON = {"quant_format": "QDQ", "per_channel": True, "calibrate_method": "MinMax"}


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when it is not installed (never imports it twice)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return onnxruntime.__version__


def missing_modules() -> list[str]:
    """What ONNX Runtime extraction needs (export: onnx, onnxscript) and is not installed."""
    return [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]


def require_onnxruntime(why: str) -> None:
    missing = missing_modules()
    if missing:
        raise FmnistError(f"{why} needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime")


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, Any] | None = None,
    opset: int = OPSET,
    input_name: str = "images",
    output_name: str = "logits",
    what: str = "ONNX export",
) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension, one self-contained file."""
    require_onnxruntime(what)
    for name in ("onnx_ir", "onnxscript"):  # their per-pass INFO lines would flood the run log
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        module,
        (example,),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={input_name: {0: torch.export.Dim.DYNAMIC}},
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    program.save(path, external_data=False)


def session(path: str | Path):
    """A CPU InferenceSession with as many intra-op threads as torch uses (the cores this process may use)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Artefact store


class ArtefactStore(ManifestStore):
    """One model file + its manifest per entry (fmnist_tl.features.manifest), beside the feature cache."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, ".onnx", "model cache", "set paths.cache_dir to a writable folder with space")


def cached_artefact(store: ArtefactStore, name: str, fp: dict[str, Any], build, what: str) -> tuple[Path, dict]:
    """The entry's file and manifest; built by `build(tmp_dir) -> (path, manifest extras)` when absent or bad."""
    with store.hold(name):
        manifest, problem = store.manifest(name, fp)
        if manifest is not None:
            return store.paths(name)[0], manifest
        if problem:
            log.warning("%s %s unusable: %s; rebuilding it", what, store.paths(name)[0], problem)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=store.root) as tmp:
            built, extra = build(Path(tmp))
            seconds = round(time.perf_counter() - start, 2)
            manifest = store.commit(name, built.read_bytes(), {**manifest_head(fp), "build_seconds": seconds, **extra})
        log.info("Built %s in %.1f s -> %s", what, seconds, store.paths(name)[0])
        return store.paths(name)[0], manifest


# --------------------------------------------------------------------------------------------
# fp32 and int8 models


class UInt8Backbone(nn.Module):
    """uint8 (N, 1, 28, 28) -> pooled features (N, D): preprocessing and backbone in one graph."""

    def __init__(self, backbone: nn.Module, preprocess: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


def fp32_fingerprint(base: dict[str, Any]) -> dict[str, Any]:
    """`base`: backbone, weights_sha256, image_size, mean, std (what the features depend on)."""
    return {"format": ARTEFACT_FORMAT, "kind": "fp32", **base, "opset": OPSET, "torch": torch.__version__}


def int8_fingerprint(base: dict[str, Any], variant: str, calibration: dict[str, Any]) -> dict[str, Any]:
    """The int8 model's identity: the fp32 one, the calibration set's identity and the quantiser's settings."""
    return {
        **fp32_fingerprint(base),
        "kind": "int8",
        "variant": variant,
        "quantization": {**QUANT_COMMON, **INT8_VARIANTS[variant]},
        "calibration": calibration,
        "onnxruntime": onnxruntime_version(),
    }


def backbone_onnx(
    store: ArtefactStore, base: dict[str, Any], backbone: nn.Module, preprocess: nn.Module
) -> tuple[Path, dict[str, Any]]:
    """The fp32 ONNX model of preprocess + backbone, from the store or exported now."""
    require_onnxruntime("features.backend=onnxruntime")
    fp = fp32_fingerprint(base)
    name = f"{base['backbone']}-{base['image_size']}px-fp32-{fingerprint_key(fp)}"

    def build(tmp: Path) -> tuple[Path, dict[str, Any]]:
        module = UInt8Backbone(
            copy.deepcopy(backbone).to("cpu", memory_format=torch.contiguous_format).float().eval(),
            copy.deepcopy(preprocess).to("cpu"),
        ).eval()
        example = torch.zeros((2, 1, 28, 28), dtype=torch.uint8)
        path = tmp / "model.onnx"
        export_onnx(module, example, path, input_name="images", output_name="features")
        return path, {}

    return cached_artefact(store, name, fp, build, "fp32 ONNX model")


class CalibrationReader:
    """onnxruntime CalibrationDataReader over uint8 images, in small batches.

    Calibration memory is the point here. `__len__` and `set_range` (in batches) let quantize_static's
    `CalibStridedMinMax` fold each batch's ranges in as it goes, where by default the calibrator keeps
    every batch's outputs to the end; and the calibration session's activations grow with the batch.
    Min and max merge exactly, so the ranges and the int8 model are the same either way.
    """

    def __init__(self, images: torch.Tensor, batch_size: int = 4) -> None:
        self.batches = [images[i : i + batch_size].numpy() for i in range(0, len(images), batch_size)]
        self.index, self.end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.index, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, Any] | None:
        if self.index >= self.end:
            return None
        self.index += 1
        return {"images": self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index, self.end = 0, len(self.batches)


def quantize(fp32_path: Path, out: Path, variant: str, calibration_images: torch.Tensor, work: Path) -> None:
    """Static PTQ of an fp32 model: QDQ, per-channel, MinMax calibration (ranges cached in `work`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # per-step INFO lines
    prepared = work / "prepared.onnx"
    if not prepared.exists():  # shape inference + graph clean-up, as ONNX Runtime recommends before quantising
        quant_pre_process(str(fp32_path), str(prepared))
    settings = INT8_VARIANTS[variant]
    kwargs: dict[str, Any] = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kwargs["calibration_cache_path"] = str(work / "calibration.json")  # variants share one calibration pass
    quantize_static(
        str(prepared),
        str(out),
        CalibrationReader(calibration_images),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        activation_type=getattr(QuantType, settings["activation_type"]),
        weight_type=getattr(QuantType, settings["weight_type"]),
        reduce_range=settings["reduce_range"],
        extra_options={"CalibStridedMinMax": 1},  # one batch's outputs held at a time (CalibrationReader)
        **kwargs,
    )


def int8_onnx(
    store: ArtefactStore,
    base: dict[str, Any],
    variant: str,
    calibration: dict[str, Any],
    calibration_images: torch.Tensor,
    fp32_path: Path,
    work: Path,
) -> tuple[Path, dict[str, Any]]:
    """The int8 model of `variant`, from the store or quantised now from `fp32_path`."""
    fp = int8_fingerprint(base, variant, calibration)
    name = f"{base['backbone']}-{base['image_size']}px-{variant}-{fingerprint_key(fp)}"

    def build(tmp: Path) -> tuple[Path, dict[str, Any]]:
        path = tmp / "model.onnx"
        quantize(fp32_path, path, variant, calibration_images, work)
        return path, {"calibration_images": len(calibration_images)}

    return cached_artefact(store, name, fp, build, f"{variant} ONNX model")


# --------------------------------------------------------------------------------------------
# Extraction


class OnnxExtractor:
    """uint8 (N, 1, 28, 28) -> pooled features (N, D) float32, through an ONNX Runtime session.

    The same call interface as `features.FeatureExtractor`; the session is created at first use, so
    a run whose features are all cached never loads the model.
    """

    backend = "onnxruntime"
    compiled_used = False

    def __init__(
        self, path: Path | Callable[[], Path], precision: str, batch_size: int | None = None, progress: bool = True
    ) -> None:
        self.path = path
        self.precision = precision
        self.batch_size = int(batch_size or 16)
        self.progress = progress
        self._session = None

    @property
    def session(self):
        if self._session is None:
            self._session = session(self.path() if callable(self.path) else self.path)
        return self._session

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["features"], {"images": batch.contiguous().numpy()})[0])

    def __call__(self, images: torch.Tensor, description: str = "features") -> torch.Tensor:
        n, bs = len(images), self.batch_size
        if n == 0:
            raise FmnistError(f"{description}: no images to extract features from")
        images = images.cpu()
        out: torch.Tensor | None = None
        with progress_bar(self.progress) as bar:
            task = bar.add_task(description, total=n)
            for start in range(0, n, bs):
                feats = self.run(images[start : start + bs])
                if out is None:
                    out = torch.empty((n, feats.shape[1]), dtype=torch.float32)
                out[start : start + len(feats)] = feats
                bar.update(task, advance=len(feats))
        return out
