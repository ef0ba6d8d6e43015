"""What a speed measurement depends on (the CPU's model and flags, the GPU's name), and what the GPU supports."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fmnist_tl.core.errors import FmnistError


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo, or None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. 'AMD EPYC 9R14'), else platform's guess."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The CPU's feature flags (for the record and the probe's key: speed choices are measured, never read
    from flags)."""
    return (_cpuinfo("flags") or "").split()


def machine_name(device: torch.device | str) -> str:
    """What a speed measurement on `device` depends on: the GPU's name, or the CPU model and flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    # Virtual machines report a bare "AMD EPYC" or "Intel Xeon Processor" for generations of
    # very different speed (AVX2 only, or AVX512-BF16): timings taken on one must not be reused
    # on the other through a shared cache. The flags tell them apart; nothing is chosen from them.
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:10]
    return f"cpu:{cpu_model()} flags:{flags}"


def cuda_has_bf16() -> bool:
    """True when a CUDA GPU is present and computes in bf16 (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def require_bf16(setting: str, fix: str, device: torch.device | str | None = None) -> None:
    """Refuse `setting` (a bf16 precision, e.g. "trainer.precision=bf16-mixed") on a CUDA GPU without
    bf16, in one line that ends with `fix` (what to use instead). A no-op where there is no CUDA."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise FmnistError(f"{setting}: the GPU ({torch.cuda.get_device_name(device)}) has no bf16; use {fix}")


NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_retries_without_a_driver() -> bool:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import, so that checking for CUDA does not
    initialise it in a process that will fork DDP workers. Where NVML cannot load (no NVIDIA driver),
    torch then retries loading it at every `torch.cuda.is_available()`, and Adam/AdamW ask at every
    step: a head epoch of small steps pays for it. Without a driver CUDA can never initialise, so
    there is no fork to protect, and torch's plain check (a cheap call) is used instead.
    TransferClassifier calls this when it makes its optimizer. True when it switched the check."""
    if os.environ.get(NVML_CHECK_ENV) != "1":
        return False
    import ctypes

    try:  # torch's own probe (torch.cuda._raw_device_count_nvml) loads this name
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ[NVML_CHECK_ENV] = "0"
        return True
    return False
