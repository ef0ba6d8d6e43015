"""The extraction candidates a machine can run, and one extractor per candidate.

A candidate is a (backend, precision) pair: torch in fp32, bf16 or fp16 (optionally compiled),
or ONNX Runtime in fp32 or int8 (one per quantiser setting in `onnx_backend.INT8_VARIANTS`).
`candidates` lists those a setting allows here; `CandidateRunners` builds each one's extractor
at first use (for ONNX Runtime: the exported model, and for int8 the model quantised on a
calibration sample of training images), and keeps it for the probe, the gate and the job.
`time_runner` and `cosine_figures` measure a candidate's speed and its fidelity to fp32; which
candidate a run uses is decided from them by `fmnist_tl.features.probe`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmnist_tl.core import FmnistError, cuda_has_bf16, tensors_sha256
from fmnist_tl.features import onnx_backend
from fmnist_tl.features.extraction import PRECISIONS, FeatureExtractor, check_backend, default_batch_size
from fmnist_tl.features.manifest import fingerprint_key


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch | onnxruntime
    precision: str  # 32 | bf16 | 16 | int8
    variant: str | None = None  # the int8 quantiser settings (onnx_backend.INT8_VARIANTS)
    compiled: bool = False

    @property
    def id(self) -> str:
        name = f"{self.backend}:{self.variant or self.precision}"
        return name + ("+compile" if self.compiled else "")

    @property
    def reduced(self) -> bool:
        """Anything but fp32 must pass the fidelity gate."""
        return self.precision != "32"


def candidates(backend: str, precision: str, device: torch.device) -> list[Candidate]:
    """The candidates a (backend, precision) setting allows here; impossible settings are one-line errors."""
    check_backend(backend, precision, device)
    ort = not onnx_backend.missing_modules()
    on_cuda = device.type == "cuda"
    out: list[Candidate] = []
    if backend in ("auto", "torch"):
        for p in PRECISIONS:
            if precision in ("auto", p) and not (p == "bf16" and on_cuda and not cuda_has_bf16()):
                out.append(Candidate("torch", p))
    if backend in ("auto", "onnxruntime") and ort and not on_cuda:
        if precision in ("auto", "32"):
            out.append(Candidate("onnxruntime", "32"))
        if precision in ("auto", "int8"):
            out += [Candidate("onnxruntime", "int8", v) for v in onnx_backend.INT8_VARIANTS]
    return out


def split_samples(
    train_images: torch.Tensor, calibration: int, gate: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration images, gate images, identity): disjoint seeded samples of the training split."""
    n = len(train_images)
    gate = min(gate, max(1, n // 4))
    calibration = min(calibration, n - gate)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cal, held = train_images[perm[:calibration]], train_images[perm[calibration : calibration + gate]]
    identity = {
        "split": "train",
        "seed": seed,
        "calibration_images": calibration,
        "calibration_sha256": tensors_sha256({"images": cal}),
        "gate_images": gate,
        "gate_sha256": tensors_sha256({"images": held}),
    }
    return cal, held, identity


def timing_sample(train_images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` seeded training images for timing, repeated if the split is smaller: like the job's images."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    return train_images[order.repeat(-(-count // len(order)))[:count]]


def time_runner(
    run: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    batch_size: int,
    max_batches: int,
    max_seconds: float,
    give_up_below: float | None = None,
) -> dict[str, Any]:
    """img/s of `run` over batches of `images`: one untimed warm-up batch, then up to `max_batches`
    timed ones, stopping early once `max_seconds` have passed (a slow candidate costs little).

    `give_up_below`: if even the warm-up batch shows a rate below this, it is the result (marked
    warmup_only): such a candidate cannot win, and one that is emulated (bf16 on a CPU without bf16
    instructions) would take many times the probe's budget."""
    batches = [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
    if len(batches) < 2:
        raise FmnistError(f"the probe needs at least {2 * batch_size} training images")
    start = time.perf_counter()
    run(batches[0])
    warmup = time.perf_counter() - start
    if give_up_below is not None and batch_size / warmup < give_up_below:
        return {"img_per_s": round(batch_size / warmup, 2), "warmup_only": True, "warmup_s": round(warmup, 2)}
    done, t0 = 0, time.perf_counter()
    for batch in batches[1 : 1 + max_batches]:
        run(batch)
        done += 1
        if time.perf_counter() - t0 >= max_seconds:
            break
    seconds = time.perf_counter() - t0
    return {
        "img_per_s": round(done * batch_size / seconds, 2),
        "timed_images": done * batch_size,
        "seconds": round(seconds, 2),
        "warmup_s": round(warmup, 2),
    }


def cosine_figures(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    cos = nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=1)
    return {"mean_cosine": round(float(cos.mean()), 6), "worst_cosine": round(float(cos.min()), 6)}


class CandidateRunners:
    """Builds and keeps one extractor per candidate, for one backbone (weights) on one device.

    `base` is the backbone's identity (backbone_identity); `calibration` the identity of the int8
    calibration images `cal_images` (split_samples). ONNX models are kept in `models_dir`.
    `quantiser(candidate, images) -> features` (tests) replaces a reduced-precision candidate's
    extraction in `features`, i.e. in the fidelity gate.
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: nn.Module,
        base: dict[str, Any],
        settings: Any,
        device: torch.device,
        *,
        cal_images: torch.Tensor,
        calibration: dict[str, Any],
        models_dir: Path,
        quantiser: Callable[[Candidate, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.backbone = backbone
        self.preprocess = preprocess
        self.base = base
        self.settings = settings
        self.device = torch.device(device)
        self.batch_size = int(settings.batch_size or default_batch_size(self.device))
        self.cal_images = cal_images
        self.calibration = calibration
        self.models_dir = models_dir
        self.quantiser = quantiser
        self.onnx_store = onnx_backend.ArtefactStore(models_dir)
        self._extractors: dict[str, Any] = {}
        self._artefacts: dict[str, tuple[Path, dict[str, Any]]] = {}
        self._work: Path | None = None

    def quantization(self, c: Candidate) -> dict[str, Any] | None:
        """An int8 candidate's model identity: weights, calibration set and quantiser settings."""
        if c.precision != "int8":
            return None
        fp = onnx_backend.int8_fingerprint(self.base, c.variant, self.calibration)
        return {"key": fingerprint_key(fp), **{k: fp[k] for k in ("variant", "quantization", "calibration")}}

    def _work_dir(self) -> Path:
        if self._work is None:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self._work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.models_dir))
        return self._work

    def artefact(self, c: Candidate) -> tuple[Path, dict[str, Any]]:
        if c.id not in self._artefacts:
            fp32 = onnx_backend.backbone_onnx(self.onnx_store, self.base, self.backbone, self.preprocess)
            if c.precision == "32":
                self._artefacts[c.id] = fp32
            else:
                self._artefacts[c.id] = onnx_backend.int8_onnx(
                    self.onnx_store, self.base, c.variant, self.calibration, self.cal_images, fp32[0], self._work_dir()
                )
        return self._artefacts[c.id]

    def extractor(self, c: Candidate) -> Any:
        if c.id not in self._extractors:
            s = self.settings
            if c.backend == "torch":
                self._extractors[c.id] = FeatureExtractor(
                    self.backbone,
                    self.preprocess,
                    device=self.device,
                    precision=c.precision,
                    compile=True if c.compiled else s.compile,
                    compile_min_images=s.compile_min_images,
                    batch_size=self.batch_size,
                    progress=s.progress,
                )
            else:
                # The model is built (or loaded from the store) at first use: a run whose features
                # are all cached never needs it.
                self._extractors[c.id] = onnx_backend.OnnxExtractor(
                    lambda c=c: self.artefact(c)[0], c.precision, self.batch_size, s.progress
                )
        return self._extractors[c.id]

    def runner(self, c: Candidate) -> Callable[[torch.Tensor], torch.Tensor]:
        """One batch -> features on the CPU: eager for torch (the compiled candidate compiles at first call)."""
        ex = self.extractor(c)
        if c.backend != "torch":
            return ex.run
        if c.compiled:

            def compiled(batch: torch.Tensor) -> torch.Tensor:
                progress, ex.progress = ex.progress, False
                try:
                    return ex(batch)
                finally:
                    ex.progress = progress

            return compiled
        return ex.run_eager

    def features(self, c: Candidate, images: torch.Tensor) -> torch.Tensor:
        if self.quantiser is not None and c.reduced:
            return self.quantiser(c, images)
        run = self.runner(c)
        return torch.cat([run(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)])

    def keep_only(self, c: Candidate) -> None:
        """Drop the other candidates' extractors: their ONNX Runtime sessions hold the model and an arena."""
        self._extractors = {c.id: self._extractors[c.id]}

    def close(self) -> None:
        """Remove the quantiser's scratch files; the models stay in the store."""
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
