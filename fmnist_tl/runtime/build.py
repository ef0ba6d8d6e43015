"""Instantiating config groups, and the trainer settings that depend on more than one group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import callbacks
from omegaconf import DictConfig

from fmnist_tl.config import FinetuneConfig
from fmnist_tl.core import FmnistError, missing_progress_bar
from fmnist_tl.features import extraction_settings, features_cache_dir, measured_trainer_precision
from fmnist_tl.training import (
    AtomicCheckpointIO,
    FitProgress,
    ReseedEachEpoch,
    SilenceKnownNoise,
    TransferClassifier,
    finetune_options,
)

log = logging.getLogger(__name__)


def cpu_precision_probe(cfg: DictConfig, model: Any) -> Callable[[], str]:
    """trainer.precision=auto on a CPU for a run whose backbone runs in the trainer: measured, cached."""

    def measure() -> str:
        settings = extraction_settings(cfg.get("features") or {})
        chosen, rates = measured_trainer_precision(
            features_cache_dir(cfg),
            settings,
            model.backbone,
            model.hparams.get("backbone", "backbone"),
            model.preprocess,
        )
        log.info(
            "trainer.precision=auto: %s (measured here: torch fp32 %.1f img/s, bf16 %.1f img/s)",
            chosen,
            rates["torch:32"],
            rates["torch:bf16"],
        )
        return chosen

    return measure


def finetune_trainer_overrides(cfg: DictConfig, finetune: FinetuneConfig | None = None) -> dict[str, Any]:
    """DDP for a run with head-only epochs before its fine-tune phase.

    The stages to unfreeze require grad from the first step (so every rank's DDP registers the same
    parameters) but get no gradient until model.finetune.start_epoch; DDP accepts that only with
    find_unused_parameters=True. Such parameters keep grad None, so the optimizer leaves them alone.
    """
    start = finetune_options(finetune or cfg.model.get("finetune"), cfg.model.backbone).first_epoch
    strategy = cfg.trainer.get("strategy")
    if not start or not isinstance(strategy, str) or not strategy.startswith("ddp") or "find_unused" in strategy:
        return {}
    return {"strategy": f"{strategy}_find_unused_parameters_true"}


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, but our own one-line errors come out unwrapped."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, FmnistError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from e
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [build(c) for c in group.values() if c is not None and "_target_" in c]


def build_model(cfg: DictConfig, ckpt_path: str | None, finetune: FinetuneConfig) -> TransferClassifier:
    """The model; resuming a fine-tune run builds it without reading any weights.

    A fine-tune checkpoint holds the whole model, so neither init_from nor ImageNet weights are read.
    A head-only run still builds its weights: the feature cache extracts in setup, before Lightning
    restores the checkpoint. init_seed: a random init that a head-only checkpoint can rebuild.
    """
    resume_finetune = bool(ckpt_path) and finetune.first_epoch is not None
    extra = {"load_weights": False} if resume_finetune else {}
    model: TransferClassifier = build(cfg.model, _recursive_=False, init_seed=cfg.seed, **extra)
    if resume_finetune:  # weights_id is the checkpoint's once Lightning restores it
        log.info("Backbone %s; resuming a fine-tune run: all weights come from %s", cfg.model.backbone, ckpt_path)
    else:
        log.info("Backbone %s, weights %s", cfg.model.backbone, model.weights_id)
    return model


def build_trainer(
    cfg: DictConfig, extra_callbacks: list[L.Callback], precision: str, finetune: FinetuneConfig
) -> L.Trainer:
    """The Trainer of the config's trainer, callbacks and logger groups, with the callbacks every run has."""
    callback_list = instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("fast_dev_run"):
        # Lightning means fast_dev_run to save nothing, but ModelCheckpoint still writes last.ckpt
        # when training ends (save_last); a smoke test leaves no checkpoint behind.
        callback_list = [cb for cb in callback_list if not isinstance(cb, callbacks.Checkpoint)]
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=[
            *callback_list,
            *extra_callbacks,
            ReseedEachEpoch(cfg.seed),
            SilenceKnownNoise(),
            FitProgress(),
            *missing_progress_bar(callback_list, cfg.trainer),
        ],
        logger=instantiate_group(cfg.get("logger")) or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],
        # No ModelCheckpoint configured (callbacks=none) means no checkpoint, not Lightning's default one.
        enable_checkpointing=any(isinstance(cb, callbacks.ModelCheckpoint) for cb in callback_list),
        **finetune_trainer_overrides(cfg, finetune),
    )
    log.info("Precision %s", precision)
    return trainer
