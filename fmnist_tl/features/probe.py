"""Choosing the extraction path by measurement on this machine, and the int8 fidelity gate.

`features.backend=auto` / `features.precision=auto` time a few batches of each candidate
(fmnist_tl.features.candidates) on training images, and use the fastest that passes the fidelity gate
(cosine similarity to fp32 features of the same weights). An explicit single candidate is not
timed, and is used even if it fails the gate, with one warning line. Timings are kept per machine
and software in `probe-<key>.json` (they do not depend on the weights); gate figures per weights,
candidate and sample in `gate-<key>.json`. `trainer.precision=auto` on a CPU reads the same probe.
See docs/feature-cache.md.
"""

from __future__ import annotations

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

from fmnist_tl.backbones import backbone_identity
from fmnist_tl.core import FmnistError, atomic_write_json, machine_name
from fmnist_tl.features import onnx_backend
from fmnist_tl.features.candidates import (
    Candidate,
    CandidateRunners,
    candidates,
    cosine_figures,
    split_samples,
    time_runner,
    timing_sample,
)
from fmnist_tl.features.extraction import work_at_224
from fmnist_tl.features.manifest import fingerprint_key
from fmnist_tl.features.ranking import gate_failure, rank

log = logging.getLogger(__name__)

PROBE_FORMAT = 1
# A compiled torch candidate is timed only if its eager rate times this could beat the best
# candidate: compiling is a large fixed cost, and inductor's gain over eager stays well below this
# bound (docs/benchmarks.md compares the compiled and eager rows).
COMPILE_BOUND = 2.0


# --------------------------------------------------------------------------------------------
# Small JSON records (probe timings, gate figures), atomic and validated


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
    tie: dict[str, Any] | None = None  # candidates within PROBE_NOISE of the fastest, and what broke the tie

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
            "tie": self.tie,
            "quantization": self.quantization,
            "seconds": self.seconds,
        }

    def log(self, device: torch.device) -> None:
        """One line: the choice, why, its fidelity and the probe's rates."""
        rates = ", ".join(
            f"{k} {v['img_per_s']:.1f}" for k, v in sorted(self.timings.items(), key=lambda kv: -kv[1]["img_per_s"])
        )
        gate = self.gates.get(self.candidate.id)
        fidelity = f"; cosine to fp32 mean {gate['mean_cosine']:.4f}, worst {gate['worst_cosine']:.4f}" if gate else ""
        # Timings taken while other work held the cores are kept like any other: say so, with the fix.
        loads = [
            v.get("load_average") for v in self.timings.values() if isinstance(v.get("load_average"), (int, float))
        ]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = (
            f"; probed under load {max(loads):.1f} on {cores} cores: delete {self.probe_file} to re-probe when quiet"
            if loads and max(loads) > 1.5 * cores and device.type == "cpu"
            else ""
        )
        log.info(
            "Extraction: %s (%s%s)%s%s",
            self.candidate.id,
            self.reason,
            fidelity,
            f"; probe img/s: {rates}" if rates else "",
            busy,
        )


class Planner:
    """Times the candidates (cached), gates them (cached), and picks one; `runners` builds them.

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
        self.backbone_name = backbone_name
        self.image_size = int(preprocess.image_size)
        cal_images, self.gate_images, self.samples = split_samples(
            train_images, settings.calibration_images, settings.gate_images, settings.calibration_seed
        )
        calibration = {k: v for k, v in self.samples.items() if k.startswith("calibration") or k in ("split", "seed")}
        self.runners = CandidateRunners(
            backbone,
            preprocess,
            backbone_identity(backbone_name, weights_sha256, preprocess),
            settings,
            self.device,
            cal_images=cal_images,
            calibration=calibration,
            models_dir=self.root / "models",
            quantiser=quantiser,
        )
        self.batch_size = self.runners.batch_size
        # A warm-up batch plus the timed ones, full batches (512 on CUDA).
        self.probe_images = timing_sample(
            train_images, self.batch_size * (settings.probe_batches + 1), settings.calibration_seed + 1
        )
        self.timer = timer
        self._reference: torch.Tensor | None = None

    def measure(self, c: Candidate, best: float | None = None) -> dict[str, Any]:
        """Time `c`; `best`: the best rate measured so far (an eager torch candidate whose warm-up batch
        is already 4x slower stops there; an ONNX model's warm-up includes building it, so not those)."""
        if self.timer is not None:
            return {"img_per_s": float(self.timer(c)), "injected": True}
        give_up = best / 4 if best and c.backend == "torch" and not c.compiled else None
        # The warm-up batch is untimed (it compiles the compiled candidate); training images, like the job's.
        run = self.runners.runner(c)
        result = time_runner(run, self.probe_images, self.batch_size, self.settings.probe_batches, 3.0, give_up)
        return {**result, "load_average": round(os.getloadavg()[0], 2), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def timings(self, cands: list[Candidate], compile_ok: bool = False) -> tuple[dict[str, dict[str, Any]], Path]:
        """Probe timings of `cands`: from the probe file, measuring (and adding) the missing ones.

        `compile_ok`: the job would compile a torch extractor, so a compiled torch candidate may be timed too.
        """
        fields = probe_fields(self.device, self.backbone_name, self.image_size, self.batch_size)
        path = self.root / f"probe-{fingerprint_key(fields, 20)}.json"
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

    def gate(self, c: Candidate) -> dict[str, Any]:
        """Fidelity figures of a reduced-precision candidate (from its record, or measured now) and the verdict."""
        fields = {
            "format": PROBE_FORMAT,
            **self.runners.base,
            "candidate": Candidate(c.backend, c.precision, c.variant).id,
            "quantization": (self.runners.quantization(c) or {}).get("key"),
            "sample": {k: self.samples[k] for k in ("split", "seed", "gate_images", "gate_sha256")},
            "device": self.device.type,
            "injected": self.runners.quantiser is not None,
        }
        path = self.root / f"gate-{fingerprint_key(fields, 20)}.json"
        record = read_record(path, fields)
        if record is None or not isinstance(record.get("mean_cosine"), (int, float)):
            if self._reference is None:
                self._reference = self.runners.features(Candidate("torch", "32"), self.gate_images)
            figures = cosine_figures(self._reference, self.runners.features(c, self.gate_images))
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

    def choose(
        self, backend: str, precision: str, job_images: int | None = None, single_reason: str = "set explicitly"
    ) -> Plan:
        """The extraction path for (backend, precision); `job_images` (the job's size) decides whether a
        compiled torch candidate is in the running (as FeatureExtractor.should_compile would).
        `single_reason`: what the plan records when the setting leaves one candidate (no probe)."""
        cands = candidates(backend, precision, self.device)
        if not cands:
            raise FmnistError(f"features.backend={backend} features.precision={precision}: nothing can run it here")
        if len(cands) == 1:
            return self._explicit(cands[0], single_reason)
        compile_ok = self.settings.compile is True or (
            self.settings.compile == "auto"
            and job_images is not None
            and work_at_224(job_images, self.image_size) >= self.settings.compile_min_images
        )
        timings, probe_path = self.timings(cands, compile_ok)
        order = sorted(timings, key=lambda k: timings[k]["img_per_s"], reverse=True)
        by_id = {c.id: c for c in cands}
        compiled = self.compiled_candidate(cands, timings) if compile_ok else None
        if compiled is not None:
            by_id[compiled.id] = compiled
        chosen, why, gates, tie = rank(order, timings, by_id, self.gate, precision)
        plan = Plan(
            chosen,
            self.runners.extractor(chosen),
            why,
            timings,
            gates,
            self.runners.quantization(chosen),
            str(probe_path),
            tie=tie,
        )
        # The losers' extractors go: their ONNX Runtime sessions hold the model and an arena.
        self.runners.keep_only(chosen)
        self._reference = None
        plan.log(self.device)
        return plan

    def _explicit(self, c: Candidate, reason: str) -> Plan:
        gates = {}
        if c.reduced:
            gates[c.id] = g = self.gate(c)
            if not g["passed"]:
                log.warning(
                    "features: %s fails the fidelity gate (%s) but was set explicitly, so it is used",
                    c.id,
                    gate_failure(g),
                )
        plan = Plan(c, self.runners.extractor(c), reason, {}, gates, self.runners.quantization(c))
        plan.log(self.device)
        return plan

    def close(self) -> None:
        self.runners.close()


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
