"""The config checks that span keys or files, run once before anything is built."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.backbones import check_backbone, preprocessing
from fmnist_tl.config import FinetuneConfig, check_config
from fmnist_tl.core import FmnistError, require_modules
from fmnist_tl.training import check_finetune, finetune_options

log = logging.getLogger(__name__)


def check_logger_dependencies(loggers: Any) -> None:
    """The `logger` group's optional packages (logger=tensorboard, logger=many_loggers)."""
    for name, conf in (loggers or {}).items():
        target = str(conf.get("_target_", "")) if conf else ""
        # Lightning's TensorBoardLogger also runs on tensorboardX alone.
        if target.endswith(".TensorBoardLogger") and importlib.util.find_spec("tensorboardX") is None:
            require_modules(f"logger.{name}", "tensorboard", "tensorboard")


def check_accelerator(trainer: DictConfig) -> None:
    """A GPU trainer (trainer=gpu, trainer=ddp, trainer.accelerator=gpu) on a machine without enough GPUs."""
    accelerator = str(trainer.get("accelerator"))
    if accelerator not in ("gpu", "cuda"):
        return
    if not torch.cuda.is_available():
        raise FmnistError(
            f"trainer.accelerator={accelerator} asks for a GPU, but this machine has none "
            "(torch.cuda.is_available() is False); use trainer=cpu, or trainer=default (any device)"
        )
    devices, found = trainer.get("devices"), torch.cuda.device_count()
    if isinstance(devices, int) and devices > found:
        raise FmnistError(
            f"trainer.devices={devices} asks for {devices} GPUs, but this machine has {found} "
            f"(torch.cuda.device_count()); use trainer.devices={found}"
        )


def validate_config(cfg: DictConfig) -> FinetuneConfig:
    """Reject bad values before anything is built or written, with one line naming the key; return
    model.finetune parsed, for the job to pass on (parsed once, not again in every layer).

    Keys and types were checked by Hydra while composing (fmnist_tl/config/schemas.py); here the ranges
    declared next to each field, then what depends on more than one key or on files.
    """
    check_config(cfg)
    check_accelerator(cfg.trainer)
    check_logger_dependencies(cfg.get("logger"))
    m = cfg.model
    check_backbone(m.backbone, m.weights)
    # The preprocessing the weights expect, where the config leaves it null: the run's config.yaml,
    # its metrics and its checkpoints then record the values used.
    m.image_size, m.mean, m.std = preprocessing(m.backbone, m.weights, m.image_size, m.mean, m.std)
    # fast_dev_run runs one batch whatever the epochs, so a fine-tune config is still worth a smoke test.
    epochs = None if cfg.trainer.get("fast_dev_run") else cfg.trainer.get("max_epochs")
    ckpt = cfg.get("ckpt_path")
    # A resumed run takes every weight from its checkpoint, so init_from may be gone by then.
    ft = finetune_options(m.get("finetune"), m.backbone)
    check_finetune(ft, m.get("freeze_backbone", True), epochs, check_files=ckpt is None)
    if m.weights_path is not None and not Path(m.weights_path).is_file():
        raise FmnistError(f"model.weights_path={m.weights_path} does not exist")
    if ckpt not in (None, "last") and not Path(ckpt).is_file():
        raise FmnistError(f"ckpt_path={ckpt} does not exist; pass a .ckpt file or ckpt_path=last")
    return ft


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the result (not where files go or whether we resume)."""
    keep = {
        k: v
        for k, v in OmegaConf.to_container(cfg, resolve=False).items()
        if k not in ("paths", "hydra", "ckpt_path", "tags", "callbacks", "logger")
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
