"""trainer.precision: explicit values obeyed, auto resolved for the device."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from fmnist_tl.core import cuda_has_bf16, require_bf16

log = logging.getLogger(__name__)


def resolve_precision(trainer_cfg: DictConfig, measure: Callable[[], str] | None = None) -> str:
    """trainer.precision: explicit values are obeyed; auto is bf16-mixed on a CUDA GPU with bf16, and on
    a CPU whatever `measure()` finds faster (the extraction probe's torch fp32 vs bf16), or 32-true
    when the backbone does not run in the trainer (measure=None: features are cached)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision.startswith("bf16") and on_cuda:
        require_bf16(f"trainer.precision={precision}", "16-mixed, 32-true or auto")
    if precision != "auto":
        return precision
    if on_cuda:
        return "bf16-mixed" if cuda_has_bf16() else "32-true"
    return measure() if measure is not None else "32-true"
