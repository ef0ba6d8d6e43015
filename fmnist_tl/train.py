"""Train the transfer classifier: `python -m fmnist_tl.train [hydra overrides]`.

`train(cfg)` is the whole job as a function (tests and sweepers call it); `main` adds Hydra and
turns user errors into one-line messages with a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import callbacks
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.features import feature_cache_for
from fmnist_tl.model import TransferClassifier, check_backbone, check_finetune, finetune_start_epoch
from fmnist_tl.utils import (
    FmnistError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    bf16_supported,
    exit_on_user_error,
    reject_unknown_keys,
    remove_stale_temp_files,
)

log = logging.getLogger(__name__)
# The frozen backbone is in eval mode on purpose (BatchNorm stats must not move).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
TOP_LEVEL_KEYS = {
    "data",
    "model",
    "callbacks",
    "logger",
    "trainer",
    "paths",
    "features",
    "hydra",
    "experiment",
    "hparams_search",
    "debug",
    "task_name",
    "tags",
    "seed",
    "ckpt_path",
    "test",
    "optimized_metric",
    "report",
}


def _positive_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FmnistError(f"{name}={value!r} must be a number, e.g. {name}=0.001")
    if not math.isfinite(value) or value <= 0:
        raise FmnistError(f"{name}={value} must be a positive finite number")
    return float(value)


def _int_at_least(value: Any, name: str, low: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FmnistError(f"{name}={value!r} must be an integer >= {low}{why}")
    return value


def validate_config(cfg: DictConfig) -> None:
    """Reject bad values before anything is built or written, with one line naming the key."""
    reject_unknown_keys(cfg, TOP_LEVEL_KEYS, "conf/train.yaml")
    m, d = cfg.model, cfg.data
    check_backbone(m.backbone, m.weights)
    _positive_number(m.optimizer.lr, "model.optimizer.lr")
    if m.optimizer.get("weight_decay") is not None and (
        not isinstance(m.optimizer.weight_decay, (int, float)) or m.optimizer.weight_decay < 0
    ):
        raise FmnistError(f"model.optimizer.weight_decay={m.optimizer.weight_decay!r} must be a number >= 0")
    dropout = m.head.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise FmnistError(f"model.head.dropout={dropout!r} must be in [0, 1)")
    for i, width in enumerate(m.head.get("hidden_dims") or []):
        _int_at_least(width, f"model.head.hidden_dims[{i}]", 1)
    _int_at_least(d.batch_size, "data.batch_size", 1)
    _int_at_least(d.image_size, "data.image_size", 32, " (ResNets downsample 32x)")
    _int_at_least(d.val_size, "data.val_size", 1)
    _int_at_least(d.num_workers, "data.num_workers", 0)
    if cfg.trainer.get("max_epochs") is not None:
        _int_at_least(cfg.trainer.max_epochs, "trainer.max_epochs", 1)
    # fast_dev_run runs one batch whatever the epochs, so a fine-tune config is still worth a smoke test.
    epochs = None if cfg.trainer.get("fast_dev_run") else cfg.trainer.get("max_epochs")
    ckpt = cfg.get("ckpt_path")
    # A resumed run takes every weight from its checkpoint, so init_from may be gone by then.
    check_finetune(m.get("finetune"), m.get("freeze_backbone", True), epochs, check_files=ckpt is None)
    if m.weights_path is not None and not Path(m.weights_path).is_file():
        raise FmnistError(f"model.weights_path={m.weights_path} does not exist")
    if ckpt not in (None, "last") and not Path(ckpt).is_file():
        raise FmnistError(f"ckpt_path={ckpt} does not exist; pass a .ckpt file or ckpt_path=last")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file and renamed, read back with weights_only=True.

    A kill -9 mid-save leaves the previous checkpoint intact and at worst a stray temp file,
    which the next run over that directory removes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class OnExceptionCheckpoint(callbacks.OnExceptionCheckpoint):
    """Lightning's, but a failure to save (say, the disk is full) never hides the original error."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            super().on_exception(trainer, pl_module, exception)
        except Exception as e:
            log.warning("could not save the exception checkpoint: %s", e)


class ReseedEachEpoch(L.Callback):
    """Seed the RNGs from (seed, epoch, rank) at the start of every training epoch.

    Dropout masks then depend only on the epoch, so 1 epoch + resume gives the same weights as
    2 epochs straight (the sampler's order is fixed by (seed, epoch) too).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # At the first batch, not at epoch start: creating the loader iterator draws from the
        # global RNG, and Lightning does that at different points in a fresh and a resumed fit.
        if batch_idx != 0:
            return
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 1009 + trainer.global_rank) % (2**31)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def check_checkpoint_file(path: str) -> None:
    """Refuse a checkpoint Lightning could not load safely, before any training starts."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise FmnistError(f"ckpt_path={path} refused: it holds objects other than tensors and plain containers") from e
    except Exception as e:
        why = type(e).__name__
        raise FmnistError(f"ckpt_path={path} is corrupt or truncated ({why}); pick another checkpoint") from e


def resolve_precision(trainer_cfg: DictConfig) -> str:
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_supported(str(trainer_cfg.get("accelerator", "auto"))) else "32-true"


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last` means the newest checkpoints/last.ckpt of an earlier run of this task.

    Exception checkpoints (on_exception.ckpt, written after a crash or NaN) are never picked.
    """
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path is not None:
            check_checkpoint_file(cfg.ckpt_path)
        return cfg.ckpt_path
    root = Path(cfg.paths.log_dir) / cfg.task_name
    here = Path(cfg.paths.output_dir).resolve()
    found = [p for p in root.glob("**/checkpoints/last.ckpt") if here not in p.resolve().parents]
    if not found:
        raise FmnistError(f"ckpt_path=last: no checkpoints/last.ckpt under {root}; pass ckpt_path=PATH instead")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    check_checkpoint_file(str(newest))
    log.info("Resuming from %s", newest)
    return str(newest)


def finetune_trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """DDP for a run with head-only epochs before its fine-tune phase.

    The stages to unfreeze require grad from the first step (so every rank's DDP registers the same
    parameters) but get no gradient until model.finetune.start_epoch; DDP accepts that only with
    find_unused_parameters=True. Such parameters keep grad None, so the optimizer leaves them alone.
    """
    start = finetune_start_epoch(cfg.model.get("finetune"))
    strategy = cfg.trainer.get("strategy")
    if not start or not isinstance(strategy, str) or not strategy.startswith("ddp") or "find_unused" in strategy:
        return {}
    return {"strategy": f"{strategy}_find_unused_parameters_true"}


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the result (not where files go or whether we resume)."""
    keep = {
        k: v
        for k, v in OmegaConf.to_container(cfg, resolve=False).items()
        if k not in ("paths", "hydra", "ckpt_path", "tags", "callbacks", "logger")
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [build(c) for c in group.values() if c is not None and "_target_" in c]


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write metrics.json into the run dir; return the metrics."""
    start = time.time()
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        remove_stale_temp_files(Path(ckpt_path).parent)
    L.seed_everything(cfg.seed, workers=True)

    # Weights and data problems surface here, before a Trainer exists, so they leave no checkpoint.
    # Resuming a fine-tune run: the checkpoint holds the whole model, so neither init_from nor
    # ImageNet weights are read. (A head-only run still builds its weights: the feature cache
    # extracts in setup, before Lightning restores the checkpoint.)
    resume_finetune = bool(ckpt_path) and finetune_start_epoch(cfg.model.get("finetune")) is not None
    # init_seed: a random init that a head-only checkpoint can rebuild (model.build_backbone).
    model: TransferClassifier = build(
        cfg.model, _recursive_=False, init_seed=cfg.seed, **({"load_weights": False} if resume_finetune else {})
    )
    if resume_finetune:  # weights_id is the checkpoint's once Lightning restores it
        log.info("Backbone %s; resuming a fine-tune run: all weights come from %s", cfg.model.backbone, ckpt_path)
    else:
        log.info("Backbone %s, weights %s", cfg.model.backbone, model.weights_id)
    datamodule: L.LightningDataModule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")

    precision = resolve_precision(cfg.trainer)
    callback_list = _instantiate_group(cfg.get("callbacks"))
    if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        # Keep checkpointing where the resumed run did: Lightning restores the best score and
        # top-k bookkeeping only when the checkpoint directory is unchanged.
        for cb in callback_list:
            if type(cb) is callbacks.ModelCheckpoint:
                cb.dirpath = str(Path(ckpt_path).parent)
        log.info("Checkpoints continue in %s", Path(ckpt_path).parent)
    # Frozen backbone, no augmentation: train the head on features extracted once (features.py).
    feature_cache = feature_cache_for(cfg, model, datamodule)
    if feature_cache:
        callback_list.append(feature_cache)
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=[*callback_list, ReseedEachEpoch(cfg.seed)],
        logger=_instantiate_group(cfg.get("logger")) or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],
        **finetune_trainer_overrides(cfg),
    )
    log.info("Precision %s", precision)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (SIGTERMException, KeyboardInterrupt, SystemExit) as e:
        # Lightning already ran OnExceptionCheckpoint; say where it is and how to go on.
        saved = output_dir / "checkpoints" / "on_exception.ckpt"
        where = f"; checkpoint saved at {saved}, resume with ckpt_path={saved}" if saved.is_file() else ""
        raise FmnistError(f"training interrupted ({type(e).__name__}){where}") from e
    val = {k: _metric(trainer, k) for k in ("val/acc", "val/f1", "val/loss")}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and not Path(best).is_file():
        # A resumed run restores the best path recorded in its checkpoint; that run folder may be gone.
        last = trainer.checkpoint_callback.last_model_path
        fallback = last if last and Path(last).is_file() else ""
        log.warning("best checkpoint %s no longer exists; testing %s", best, fallback or "the final weights")
        best = fallback
    test: dict[str, float | None] = {}
    if cfg.get("test"):
        use_best = bool(best) and not trainer.fast_dev_run
        # Imported here because evaluate imports this module. The recorder keeps the test logits,
        # so the evaluation report costs no second pass over the test set.
        from fmnist_tl.evaluate import RecordTestOutputs, write_report

        recorder = RecordTestOutputs()
        trainer.callbacks.append(recorder)
        trainer.test(model, datamodule=datamodule, ckpt_path=best if use_best else None, weights_only=True)
        test = {k: _metric(trainer, k) for k in ("test/acc", "test/f1", "test/loss")}
        if use_best and trainer.world_size == 1:
            plots = bool(OmegaConf.select(cfg, "report.plots", default=True))
            write_report(recorder, datamodule, model, best, output_dir, test, precision, plots=plots)
        elif use_best and trainer.is_global_zero:
            log.info(
                "no automatic report under %d processes; run: python -m fmnist_tl.evaluate ckpt_path=%s",
                trainer.world_size,
                best,
            )
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
        val[cfg.optimized_metric] = float(trainer.checkpoint_callback.best_model_score)

    metrics = {
        "status": "completed",
        **val,
        **test,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_model_path": best,
        "wall_time_s": round(time.time() - start, 2),
        "weights_id": model.weights_id,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "precision": precision,
        "feature_cache": feature_cache.summary() if feature_cache else "off",
        "config_hash": config_hash(cfg),
        "optimized_metric": cfg.optimized_metric,
        "resumed_from": ckpt_path,
    }
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "val acc %s, test acc %s -> %s",
            metrics.get("val/acc"),
            metrics.get("test/acc"),
            output_dir / "metrics.json",
        )
    return metrics


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def record_failed_job(cfg: DictConfig, status: str, error: str, start: float) -> None:
    """Write a failed or interrupted job's metrics.json, so sweep summaries list it with its reason."""
    record = {
        "status": status,
        "error": error,
        "wall_time_s": round(time.time() - start, 2),
        "optimized_metric": cfg.get("optimized_metric"),
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", record)


def _summarize_stopped_sweep() -> None:
    """A stopped sweep never reaches Hydra's on_multirun_end: write its summary from here."""
    try:
        from fmnist_tl.summarize import write_summary

        write_summary(HydraConfig.get().sweep.dir, plot=False)
    except Exception:  # the jobs' results are on disk; `python -m fmnist_tl.summarize` can redo this
        log.exception("could not write the summary of the stopped sweep")


def _interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind an exception, also when it arrives wrapped in another error."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (KeyboardInterrupt, SystemExit)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _job_error(e: BaseException) -> str:
    message = str(e) if isinstance(e, FmnistError) else f"{type(e).__name__}: {e}"
    return message.strip().splitlines()[0] if message.strip() else type(e).__name__


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    start = time.time()
    multirun = _is_multirun()
    with exit_on_user_error():
        try:
            metrics = train(cfg)
        except BaseException as e:
            if not multirun:
                if isinstance(e, KeyboardInterrupt) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                    print("error: interrupted", file=sys.stderr)
                    sys.exit(130)
                raise
            interrupted = _interruption(e)
            if interrupted is not None:
                # Ctrl-C and SIGTERM stop the whole sweep, not just this job (mid-fit, Lightning
                # turns them into SystemExit / SIGTERMException). Record, summarise, exit.
                signal_name = "SIGTERM" if isinstance(interrupted, SIGTERMException) else "Ctrl-C"
                why = str(e) if isinstance(e, FmnistError) else f"stopped by {signal_name}"
                record_failed_job(cfg, "interrupted", f"{why}; the sweep stopped here", start)
                _summarize_stopped_sweep()
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {why}; the sweep stopped here", file=sys.stderr)
                sys.exit(143 if signal_name == "SIGTERM" else 130)
            if not isinstance(e, Exception):
                raise
            # One failing job must not kill the sweep: any exception (a user error, a NaN loss, a
            # bug, out of memory) is recorded in the job's metrics.json, with the trace of a bug in
            # the job's log; sweepers get NaN (Optuna marks the trial failed) and go on.
            log.error("job failed: %s", _job_error(e), exc_info=not isinstance(e, FmnistError))
            record_failed_job(cfg, "failed", _job_error(e), start)
            return float("nan")
    print(json.dumps({k: metrics[k] for k in ("val/acc", "val/f1", "test/acc", "test/f1") if k in metrics}))
    value = metrics.get(cfg.optimized_metric)
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
