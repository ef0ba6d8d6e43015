"""Choosing the extraction path by measurement on this machine, and the int8 fidelity gate.

`features.backend=auto` / `features.precision=auto` run a short probe: a few batches of each
candidate (torch fp32/bf16/16, ONNX Runtime fp32 and int8 variants) on training images, timed on
this machine. The fastest candidate that passes the fidelity gate is used:

- **Probe cache.** The timings are kept per machine (CPU model or GPU name, threads), torch and
  onnxruntime versions, backbone, image size and batch size in `probe-<key>.json` under the feature
  cache: they do not depend on the weights. Deleting the file re-probes.
- **Fidelity gate.** Before a reduced-precision candidate is used, its features on a seeded sample
  of training images (disjoint from the int8 calibration images) are compared with fp32 features of
  the same weights; the mean and the worst cosine similarity must clear `features.gate_mean_cosine`
  and `features.gate_worst_cosine`. The figures are kept per (weights, candidate, quantiser,
  calibration set, sample) in `gate-<key>.json`: they depend on the weights, the timings do not.
- **Explicit settings** are obeyed: a single candidate is not timed; if it is a reduced precision
  that fails the gate it is still used, with one warning line.

`trainer.precision=auto` on a CPU reads the same probe (torch fp32 vs bf16): bf16 only where it is
measured faster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch
from torch import nn

from fmnist_tl import onnx_backend
from fmnist_tl.utils import FmnistError, atomic_write_json, machine_name

log = logging.getLogger(__name__)

PROBE_FORMAT = 1
TORCH_PRECISIONS = ("32", "bf16", "16")
# A compiled torch candidate is timed only if its eager rate times this could beat the best
# candidate: compiling ResNet50 costs about a minute on a small CPU, and inductor has not been
# measured to gain more than 1.5x over eager (README, "Measured speed on CPU").
COMPILE_BOUND = 2.0


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


def check_backend(backend: str, precision: str, device: torch.device | None = None) -> None:
    """One-line errors for (backend, precision) settings that cannot run (here, when `device` is given)."""
    on_cuda = device is not None and device.type == "cuda"
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise FmnistError(
            f"features.precision=bf16: the GPU ({torch.cuda.get_device_name(device)}) has no bf16; use 16, 32 or auto"
        )
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


def candidates(backend: str, precision: str, device: torch.device) -> list[Candidate]:
    """The candidates a (backend, precision) setting allows here; impossible settings are one-line errors."""
    check_backend(backend, precision, device)
    ort = not onnx_backend.missing_modules()
    on_cuda = device.type == "cuda"
    out: list[Candidate] = []
    if backend in ("auto", "torch"):
        for p in TORCH_PRECISIONS:
            if precision in ("auto", p) and not (p == "bf16" and on_cuda and not torch.cuda.is_bf16_supported()):
                out.append(Candidate("torch", p))
    if backend in ("auto", "onnxruntime") and ort and not on_cuda:
        if precision in ("auto", "32"):
            out.append(Candidate("onnxruntime", "32"))
        if precision in ("auto", "int8"):
            out += [Candidate("onnxruntime", "int8", v) for v in onnx_backend.INT8_VARIANTS]
    return out


# --------------------------------------------------------------------------------------------
# Samples: calibration and gate images, both from the training split


def split_samples(
    train_images: torch.Tensor, calibration: int, gate: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration images, gate images, identity): disjoint seeded samples of the training split."""
    n = len(train_images)
    gate = min(gate, max(1, n // 4))
    calibration = min(calibration, n - gate)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cal, held = train_images[perm[:calibration]], train_images[perm[calibration : calibration + gate]]
    from fmnist_tl.features import tensors_sha256

    identity = {
        "split": "train",
        "seed": seed,
        "calibration_images": calibration,
        "calibration_sha256": tensors_sha256({"images": cal}),
        "gate_images": gate,
        "gate_sha256": tensors_sha256({"images": held}),
    }
    return cal, held, identity


def cosine_figures(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    cos = nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=1)
    return {"mean_cosine": round(float(cos.mean()), 6), "worst_cosine": round(float(cos.min()), 6)}


# --------------------------------------------------------------------------------------------
# Small JSON records (probe timings, gate figures), atomic and validated


def record_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def read_record(path: Path, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The record at `path` if it is valid JSON made for exactly `fields`, else None (with a warning if bad)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s); measuring again", path, type(e).__name__)
        return None
    if not isinstance(record, dict) or record.get("fields") != fields:
        log.warning("%s was made for other settings; measuring again", path)
        return None
    return record


def probe_fields(device: torch.device, backbone: str, image_size: int, batch_size: int) -> dict[str, Any]:
    """What the timings depend on: the machine, the software, the network's shape and the batch size."""
    return {
        "format": PROBE_FORMAT,
        "machine": machine_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnx_backend.onnxruntime_version(),
        "backbone": backbone,
        "image_size": int(image_size),
        "batch_size": int(batch_size),
    }


def valid_timing(entry: Any) -> bool:
    rate = entry.get("img_per_s") if isinstance(entry, dict) else None
    return isinstance(rate, (int, float)) and rate > 0


# --------------------------------------------------------------------------------------------
# Timing


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
    warmup_only): such a candidate cannot win, and emulated bf16 on a CPU takes ~30 s per batch."""
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


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """The chosen extraction path, its extractor, and what the run records about the choice."""

    candidate: Candidate
    extractor: Any
    reason: str
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # int8: the model's identity (cache key) and settings
    probe_file: str | None = None
    seconds: float | None = None  # what choosing cost (set by the caller that timed it)

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.candidate.backend,
            "precision": self.candidate.precision,
            "variant": self.candidate.variant,
            "candidate": self.candidate.id,
            "reason": self.reason,
            "probe": {k: v.get("img_per_s") for k, v in self.timings.items()},
            "probe_file": self.probe_file,
            "gate": self.gates,
            "quantization": self.quantization,
            "seconds": self.seconds,
        }


class Planner:
    """Builds runners for candidates, times them (cached), gates them (cached), and picks one.

    `timer` and `quantiser` can be injected (tests): `timer(candidate) -> img/s` replaces the
    measurement; `quantiser(candidate, images) -> features` replaces a candidate's extraction in the gate.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        settings: Any,
        device: torch.device,
        backbone: nn.Module,
        backbone_name: str,
        preprocess: nn.Module,
        weights_sha256: str,
        train_images: torch.Tensor,
        timer: Callable[[Candidate], float] | None = None,
        quantiser: Callable[[Candidate, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.device = torch.device(device)
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.preprocess = preprocess
        self.weights_sha256 = weights_sha256
        self.batch_size = int(settings.batch_size or (512 if self.device.type == "cuda" else 16))
        self.cal_images, self.gate_images, self.samples = split_samples(
            train_images, settings.calibration_images, settings.gate_images, settings.calibration_seed
        )
        # Timing images: a warm-up batch plus the timed ones, full batches (512 on CUDA), seeded.
        need = self.batch_size * (settings.probe_batches + 1)
        order = torch.randperm(
            len(train_images), generator=torch.Generator().manual_seed(settings.calibration_seed + 1)
        )
        self.probe_images = train_images[order.repeat(-(-need // len(order)))[:need]]
        self.timer = timer
        self.quantiser = quantiser
        self.onnx_store = onnx_backend.ArtefactStore(self.root / "models")
        self._extractors: dict[str, Any] = {}
        self._artefacts: dict[str, tuple[Path, dict[str, Any]]] = {}
        self._reference: torch.Tensor | None = None
        self._work: Path | None = None

    # --- identities -------------------------------------------------------------------------
    @property
    def base(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "weights_sha256": self.weights_sha256,
            "image_size": int(self.preprocess.image_size),
            "mean": [round(float(m), 8) for m in self.preprocess.mean.flatten().tolist()],
            "std": [round(float(s), 8) for s in self.preprocess.std.flatten().tolist()],
        }

    def calibration(self) -> dict[str, Any]:
        return {k: v for k, v in self.samples.items() if k.startswith("calibration") or k in ("split", "seed")}

    def quantization(self, c: Candidate) -> dict[str, Any] | None:
        """An int8 candidate's model identity: weights, calibration set and quantiser settings."""
        if c.precision != "int8":
            return None
        fp = onnx_backend.int8_fingerprint(self.base, c.variant, self.calibration())
        return {"key": onnx_backend.artefact_key(fp), **{k: fp[k] for k in ("variant", "quantization", "calibration")}}

    # --- runners ----------------------------------------------------------------------------
    def _work_dir(self) -> Path:
        if self._work is None:
            import tempfile

            (self.root / "models").mkdir(parents=True, exist_ok=True)
            self._work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.root / "models"))
        return self._work

    def artefact(self, c: Candidate) -> tuple[Path, dict[str, Any]]:
        if c.id not in self._artefacts:
            fp32 = onnx_backend.backbone_onnx(self.onnx_store, self.base, self.backbone, self.preprocess)
            if c.precision == "32":
                self._artefacts[c.id] = fp32
            else:
                self._artefacts[c.id] = onnx_backend.int8_onnx(
                    self.onnx_store,
                    self.base,
                    c.variant,
                    self.calibration(),
                    self.cal_images,
                    fp32[0],
                    self._work_dir(),
                )
        return self._artefacts[c.id]

    def extractor(self, c: Candidate) -> Any:
        if c.id not in self._extractors:
            s = self.settings
            if c.backend == "torch":
                from fmnist_tl.features import FeatureExtractor

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

    # --- timing -----------------------------------------------------------------------------
    def measure(self, c: Candidate, best: float | None = None) -> dict[str, Any]:
        """Time `c`; `best`: the best rate measured so far (an eager torch candidate whose warm-up batch
        is already 4x slower stops there; an ONNX model's warm-up includes building it, so not those)."""
        if self.timer is not None:
            return {"img_per_s": float(self.timer(c)), "injected": True}
        give_up = best / 4 if best and c.backend == "torch" and not c.compiled else None
        # The warm-up batch is untimed (it compiles the compiled candidate); training images, like the job's.
        result = time_runner(
            self.runner(c), self.probe_images, self.batch_size, self.settings.probe_batches, 3.0, give_up
        )
        return {**result, "load_average": round(os.getloadavg()[0], 2), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def timings(self, cands: list[Candidate], compile_ok: bool = False) -> tuple[dict[str, dict[str, Any]], Path]:
        """Probe timings of `cands`: from the probe file, measuring (and adding) the missing ones.

        `compile_ok`: the job would compile a torch extractor, so a compiled torch candidate may be timed too.
        """
        fields = probe_fields(self.device, self.backbone_name, self.preprocess.image_size, self.batch_size)
        path = self.root / f"probe-{record_key(fields)}.json"
        record = read_record(path, fields) or {"fields": fields, "candidates": {}}
        known = {k: v for k, v in record.get("candidates", {}).items() if valid_timing(v)}
        # ONNX Runtime first: on a CPU it is the likely winner, and then slow torch candidates stop early.
        missing = sorted((c for c in cands if c.id not in known), key=lambda c: c.backend != "onnxruntime")
        for c in missing:
            best = max((v["img_per_s"] for k, v in known.items() if k in {x.id for x in cands}), default=None)
            known[c.id] = self.measure(c, best)
            log.info("Probe %s: %.1f img/s", c.id, known[c.id]["img_per_s"])
        # A compiled torch candidate, if eager torch is close enough that compiling could win.
        compiled = self.compiled_candidate(cands, known) if compile_ok else None
        if compiled is not None and compiled.id not in known:
            known[compiled.id] = self.measure(compiled)
            missing.append(compiled)
            log.info("Probe %s: %.1f img/s", compiled.id, known[compiled.id]["img_per_s"])
        if missing:
            atomic_write_json(path, {"fields": fields, "candidates": known})
        wanted = {c.id for c in cands} | ({compiled.id} if compiled is not None else set())
        return {k: v for k, v in known.items() if k in wanted}, path

    def compiled_candidate(self, cands: list[Candidate], known: dict[str, dict[str, Any]]) -> Candidate | None:
        """The best eager torch candidate compiled, worth timing only if it could overtake a faster other
        backend (if eager torch already wins, it is compiled anyway as features.compile says)."""
        if self.settings.compile is False or self.timer is not None:
            return None
        torch_cands = [c for c in cands if c.backend == "torch" and not c.compiled]
        others = [known[c.id]["img_per_s"] for c in cands if c.backend != "torch"]
        if not torch_cands or not others:
            return None
        best_torch = max(torch_cands, key=lambda c: known[c.id]["img_per_s"])
        eager = known[best_torch.id]["img_per_s"]
        if eager >= max(others) or eager * COMPILE_BOUND < max(others):
            return None
        return Candidate("torch", best_torch.precision, compiled=True)

    # --- gate -------------------------------------------------------------------------------
    def gate_fields(self, c: Candidate) -> dict[str, Any]:
        return {
            "format": PROBE_FORMAT,
            **self.base,
            "candidate": Candidate(c.backend, c.precision, c.variant).id,
            "quantization": (self.quantization(c) or {}).get("key"),
            "sample": {k: self.samples[k] for k in ("split", "seed", "gate_images", "gate_sha256")},
            "device": self.device.type,
            "injected": self.quantiser is not None,
        }

    def gate(self, c: Candidate) -> dict[str, Any]:
        """Fidelity figures of a reduced-precision candidate (from its record, or measured now) and the verdict."""
        fields = self.gate_fields(c)
        path = self.root / f"gate-{record_key(fields)}.json"
        record = read_record(path, fields)
        if record is None or not isinstance(record.get("mean_cosine"), (int, float)):
            if self._reference is None:
                self._reference = self.features(Candidate("torch", "32"), self.gate_images)
            figures = cosine_figures(self._reference, self.features(c, self.gate_images))
            record = {"fields": fields, **figures, "images": len(self.gate_images)}
            atomic_write_json(path, record)
        s = self.settings
        passed = record["mean_cosine"] >= s.gate_mean_cosine and record["worst_cosine"] >= s.gate_worst_cosine
        return {
            "mean_cosine": record["mean_cosine"],
            "worst_cosine": record["worst_cosine"],
            "images": record.get("images"),
            "thresholds": {"mean": s.gate_mean_cosine, "worst": s.gate_worst_cosine},
            "passed": passed,
        }

    # --- choice -----------------------------------------------------------------------------
    def choose(self, backend: str, precision: str, job_images: int | None = None) -> Plan:
        """The extraction path for (backend, precision); `job_images` (the job's size) decides whether a
        compiled torch candidate is in the running (as FeatureExtractor.should_compile would)."""
        cands = candidates(backend, precision, self.device)
        if not cands:
            raise FmnistError(f"features.backend={backend} features.precision={precision}: nothing can run it here")
        if len(cands) == 1:
            return self._explicit(cands[0])
        compile_ok = self.settings.compile is True or (
            self.settings.compile == "auto"
            and job_images is not None
            and job_images * (self.preprocess.image_size / 224) ** 2 >= self.settings.compile_min_images
        )
        timings, probe_path = self.timings(cands, compile_ok)
        order = sorted(timings, key=lambda k: timings[k]["img_per_s"], reverse=True)
        by_id = {c.id: c for c in cands}
        compiled = self.compiled_candidate(cands, timings) if compile_ok else None
        if compiled is not None:
            by_id[compiled.id] = compiled
        gates: dict[str, dict[str, Any]] = {}
        rejected: list[str] = []
        for cid in order:
            c = by_id[cid]
            if c.reduced:
                gates[cid] = self.gate(c)
                if not gates[cid]["passed"]:
                    g = gates[cid]
                    log.warning(
                        "Extraction candidate %s fails the fidelity gate (cosine to fp32 features: mean %.4f, "
                        "worst %.4f; need %.4f / %.4f); falling back to the next fastest",
                        cid,
                        g["mean_cosine"],
                        g["worst_cosine"],
                        g["thresholds"]["mean"],
                        g["thresholds"]["worst"],
                    )
                    rejected.append(cid)
                    continue
            why = (
                "fastest measured"
                if not rejected
                else f"fastest that passes the fidelity gate ({', '.join(rejected)} failed)"
            )
            plan = Plan(c, self.extractor(c), why, timings, gates, self.quantization(c), str(probe_path))
            self._keep_only(c)
            self._log_choice(plan)
            return plan
        raise AssertionError("the fp32 candidate always passes")  # pragma: no cover

    def _explicit(self, c: Candidate) -> Plan:
        gates = {}
        if c.reduced:
            gates[c.id] = g = self.gate(c)
            if not g["passed"]:
                log.warning(
                    "features: %s fails the fidelity gate (cosine to fp32 features: mean %.4f, worst %.4f; need "
                    "%.4f / %.4f) but was set explicitly, so it is used",
                    c.id,
                    g["mean_cosine"],
                    g["worst_cosine"],
                    g["thresholds"]["mean"],
                    g["thresholds"]["worst"],
                )
        plan = Plan(c, self.extractor(c), "set explicitly", {}, gates, self.quantization(c))
        self._log_choice(plan)
        return plan

    def _keep_only(self, c: Candidate) -> None:
        """Drop the losing candidates' extractors: their ONNX Runtime sessions hold the model and an arena."""
        self._extractors = {c.id: self._extractors[c.id]}
        self._reference = None

    def _log_choice(self, plan: Plan) -> None:
        rates = ", ".join(
            f"{k} {v['img_per_s']:.1f}" for k, v in sorted(plan.timings.items(), key=lambda kv: -kv[1]["img_per_s"])
        )
        gate = plan.gates.get(plan.candidate.id)
        fidelity = f"; cosine to fp32 mean {gate['mean_cosine']:.4f}, worst {gate['worst_cosine']:.4f}" if gate else ""
        # Timings taken while other work held the cores are kept like any other: say so, with the fix.
        loads = [
            v.get("load_average") for v in plan.timings.values() if isinstance(v.get("load_average"), (int, float))
        ]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = (
            f"; probed under load {max(loads):.1f} on {cores} cores: delete {plan.probe_file} to re-probe when quiet"
            if loads and max(loads) > 1.5 * cores and self.device.type == "cpu"
            else ""
        )
        log.info(
            "Extraction: %s (%s%s)%s%s",
            plan.candidate.id,
            plan.reason,
            fidelity,
            f"; probe img/s: {rates}" if rates else "",
            busy,
        )

    def close(self) -> None:
        if self._work is not None:
            import shutil

            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None


def probe_lock(root: str | Path) -> filelock.FileLock:
    """One probe at a time per cache: concurrent jobs would skew each other's timings, then share the result."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(Path(root) / "probe.lock"))


def measured_trainer_precision(
    root: str | Path, settings: Any, backbone: nn.Module, backbone_name: str, preprocess: nn.Module
) -> tuple[str, dict[str, float]]:
    """trainer.precision=auto on a CPU: bf16-mixed only if the probe measures torch bf16 faster than fp32.

    Reads (or adds to) the extraction probe's record for this machine: the same forward passes.
    """
    images = torch.randint(0, 256, (32 * 16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    planner = Planner(
        root=root,
        settings=settings,
        device=torch.device("cpu"),
        backbone=backbone,
        backbone_name=backbone_name,
        preprocess=preprocess,
        weights_sha256="timing-only",
        train_images=images,
    )
    fp32, bf16 = Candidate("torch", "32"), Candidate("torch", "bf16")
    with probe_lock(root):
        timings, _ = planner.timings([fp32, bf16])
    rates = {k: v["img_per_s"] for k, v in timings.items() if k in (fp32.id, bf16.id)}
    return ("bf16-mixed" if rates[bf16.id] > rates[fp32.id] else "32-true"), rates
