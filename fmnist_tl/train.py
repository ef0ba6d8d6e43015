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
import random
import re
import sys
import time
import warnings
from collections.abc import Callable
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
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.features import ExtractionSettings, feature_cache_for, features_cache_dir
from fmnist_tl.model import (
    TransferClassifier,
    check_backbone,
    check_finetune,
    finetune_start_epoch,
    legacy_lr_plan,
    load_checkpoint_file,
    schedule_kind,
)
from fmnist_tl.probe import measured_trainer_precision
from fmnist_tl.utils import (
    CONFIG_PATH,
    FmnistError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_logger_dependencies,
    exit_on_user_error,
    reject_unknown_keys,
    remove_stale_temp_files,
)

log = logging.getLogger(__name__)
# The frozen backbone is in eval mode on purpose (BatchNorm stats must not move).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Mixed precision keeps fp32 weights, so the summary's 32-bit size estimate it warns about is right.
warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")


class _DropAdvertTips(logging.Filter):
    """Lightning logs a tip to install litlogger/litmodels (a cloud service) on every run: not ours to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") and ("litlogger" in message or "litmodels" in message))


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertTips())

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
    check_logger_dependencies(cfg.get("logger"))
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


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's, with last.ckpt written after every epoch and a moved or copied run folder continued.

    Since Lightning 2.6, save_last writes last.ckpt only in an epoch that also wrote a top-k
    checkpoint, so once val/acc stops improving last.ckpt falls behind and a resume redoes the
    epochs since. Here it is written at every save point, as before 2.6 (with 2.5 the extra call
    finds the step saved already and does nothing).

    A resumed run checkpoints into the folder of the checkpoint it resumes (see train()), whose
    state names files by their path when it was saved. Lightning restores the top-k and last-file
    state only if that path is unchanged; for a moved or copied folder it would keep the old best
    file forever next to the new one. With `rebase_resumed_paths` the recorded paths are moved
    into this dirpath first. (conf/callbacks/default.yaml also turns the -v1 version counter off:
    a file of the same name is this run's, to overwrite.)
    """

    rebase_resumed_paths = False

    def _save_last_if_missed(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
        if (
            self.save_last
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
            and not self._should_skip_saving_checkpoint(trainer)  # also: saved at this step already
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if self.rebase_resumed_paths and old and self.dirpath and Path(old) != Path(self.dirpath):

            def moved(path: Any) -> Any:
                if not path or Path(old) not in Path(path).parents:
                    return path
                return str(Path(self.dirpath) / Path(path).relative_to(old))

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


class OnExceptionCheckpoint(callbacks.Checkpoint):
    """Save `dirpath/filename.ckpt` on Ctrl-C, SIGTERM or a crash, like Lightning's callback of that name.

    Not a subclass of Lightning's: with one of those, `fit(ckpt_path=None)` takes ckpt_path="last"
    and silently resumes from any last or on-exception checkpoint already in the run dir (and warns
    about it on every fresh run); here ckpt_path=null starts fresh, and resuming is train()'s
    explicit ckpt_path. A failure to save (say, the disk is full) never hides the original error.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.dirpath, self.filename = dirpath, filename

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            trainer.save_checkpoint(self.ckpt_path)
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


def check_checkpoint_file(path: str) -> dict[str, Any]:
    """Refuse a checkpoint Lightning could not load safely, before any training starts."""
    ckpt = load_checkpoint_file(path, f"ckpt_path={path}", "pick another checkpoint", map_location="cpu", mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise FmnistError(f"ckpt_path={path} is not an fmnist_tl checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def check_resume_schedule(cfg: DictConfig, path: str, checkpoint: dict[str, Any]) -> None:
    """Refuse a resume whose LR schedule cannot go on from the checkpoint's, before anything is built.

    A resumed run restores the checkpoint's scheduler state, so it must be the same kind of
    schedule. An extended cosine or fine-tune schedule is re-planned (model.LRPlan); a one-cycle
    schedule has a warm-up and an end fixed in steps, so it is only resumed as planned.
    """
    saved = checkpoint.get("lr_plan") or legacy_lr_plan(checkpoint)
    if not saved:
        return
    kind = schedule_kind(cfg.model.get("scheduler"), cfg.model.get("finetune"))
    if saved.get("scheduler") != kind:
        raise FmnistError(
            f"ckpt_path={path} was trained with LR schedule {saved.get('scheduler') or 'constant'}, this config has "
            f"{kind or 'constant'}; resume with the checkpoint's model.scheduler and model.finetune settings"
        )
    planned, wanted = saved.get("max_epochs"), cfg.trainer.get("max_epochs")
    if kind == "OneCycleLR" and wanted is not None and planned != wanted:
        raise FmnistError(
            f"ckpt_path={path} runs a one-cycle LR schedule planned for trainer.max_epochs={planned}, which cannot "
            f"be re-planned to {wanted}; resume with trainer.max_epochs={planned}, or use model/scheduler=cosine "
            "for runs you may extend"
        )


def resolve_precision(trainer_cfg: DictConfig, measure: Callable[[], str] | None = None) -> str:
    """trainer.precision: explicit values are obeyed; auto is bf16-mixed on a CUDA GPU with bf16, and on
    a CPU whatever `measure()` finds faster (the extraction probe's torch fp32 vs bf16), or 32-true
    when the backbone does not run in the trainer (measure=None: features are cached)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision.startswith("bf16") and on_cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise FmnistError(
            f"trainer.precision={precision}: this GPU ({torch.cuda.get_device_name()}) has no bf16; "
            "use 16-mixed, 32-true or auto"
        )
    if precision != "auto":
        return precision
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return measure() if measure is not None else "32-true"


def cpu_precision_probe(cfg: DictConfig, model: Any, preprocess: Any) -> Callable[[], str]:
    """trainer.precision=auto on a CPU for a run whose backbone runs in the trainer: measured, cached."""

    def measure() -> str:
        settings = ExtractionSettings.from_config(cfg.get("features") or {})
        chosen, rates = measured_trainer_precision(
            features_cache_dir(cfg), settings, model.backbone, model.hparams.get("backbone", "backbone"), preprocess
        )
        log.info(
            "trainer.precision=auto: %s (measured here: torch fp32 %.1f img/s, bf16 %.1f img/s)",
            chosen,
            rates["torch:32"],
            rates["torch:bf16"],
        )
        return chosen

    return measure


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last` means the last checkpoint (checkpoints/last*.ckpt) of an earlier run of this task that
    trained furthest: the highest global step recorded in it, then the most recently written.

    Not file times or names alone: a copied run folder has new file times, and an older Lightning
    run may have left a stale last.ckpt next to a newer last-v1.ckpt. Exception checkpoints
    (on_exception.ckpt, written after a crash or NaN) are never picked.
    """
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path is not None:
            check_checkpoint_file(cfg.ckpt_path)
        return cfg.ckpt_path
    root = Path(cfg.paths.log_dir) / cfg.task_name
    here = Path(cfg.paths.output_dir).resolve()
    found = [p for p in root.glob("**/checkpoints/last*.ckpt") if here not in p.resolve().parents]
    if not found:
        raise FmnistError(f"ckpt_path=last: no checkpoints/last.ckpt under {root}; pass ckpt_path=PATH instead")
    steps: dict[Path, int] = {}
    for path in found:
        try:
            steps[path] = int(check_checkpoint_file(str(path)).get("global_step", -1))
        except FmnistError as e:
            log.warning("ckpt_path=last: skipping %s", e)
    if not steps:
        raise FmnistError(f"ckpt_path=last: no readable checkpoints/last.ckpt under {root}; pass ckpt_path=PATH")
    chosen = max(steps, key=lambda p: (steps[p], p.stat().st_mtime))
    log.info("Resuming from %s (global step %d)", chosen, steps[chosen])
    return str(chosen)


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
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        check_resume_schedule(cfg, ckpt_path, check_checkpoint_file(ckpt_path))
        remove_stale_temp_files(Path(ckpt_path).parent)
    output_dir.mkdir(parents=True, exist_ok=True)
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

    callback_list = _instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("fast_dev_run"):
        # Lightning means fast_dev_run to save nothing, but ModelCheckpoint still writes last.ckpt
        # when training ends (save_last); a smoke test leaves no checkpoint behind.
        callback_list = [cb for cb in callback_list if not isinstance(cb, callbacks.Checkpoint)]
    # Real path: how ModelCheckpoint itself records its dirpath, so an unmoved folder compares equal.
    resume_dir = os.path.realpath(Path(ckpt_path).parent) if ckpt_path else None
    if resume_dir and Path(resume_dir).name == "checkpoints":
        # Keep checkpointing where the resumed run did: Lightning restores the best score and
        # top-k bookkeeping only when the checkpoint directory is unchanged.
        for cb in callback_list:
            if isinstance(cb, callbacks.ModelCheckpoint):  # not ModelCheckpoint: here may be __main__
                cb.dirpath, cb.rebase_resumed_paths = resume_dir, True
        log.info("Checkpoints continue in %s", resume_dir)
    # Frozen backbone, no augmentation: train the head on features extracted once (features.py).
    feature_cache = feature_cache_for(cfg, model, datamodule)
    if feature_cache:
        callback_list.append(feature_cache)
    # With cached features the backbone never runs in the trainer (extraction has its own probe), and
    # the head trains in fp32; otherwise auto on a CPU measures fp32 against bf16.
    precision = resolve_precision(
        cfg.trainer, None if feature_cache else cpu_precision_probe(cfg, model, datamodule.preprocess)
    )
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=[*callback_list, ReseedEachEpoch(cfg.seed)],
        logger=_instantiate_group(cfg.get("logger")) or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],
        # No ModelCheckpoint configured (callbacks=none) means no checkpoint, not Lightning's default one.
        enable_checkpointing=any(isinstance(cb, callbacks.ModelCheckpoint) for cb in callback_list),
        **finetune_trainer_overrides(cfg),
    )
    log.info("Precision %s", precision)
    try:
        with warnings.catch_warnings():
            if resume_dir:
                # By design: a resumed run checkpoints into the resumed run's directory (see above).
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(resume_dir)} exists")
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
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            # Under ddp_spawn (trainer=ddp_sim) the test runs in new processes, where Lightning's
            # CSVLogger starts a new writer that deletes the fit's csv/metrics.csv (with a warning).
            # The test metrics go to metrics.json and the report.
            trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
        trainer.test(model, datamodule=datamodule, ckpt_path=best if use_best else None, weights_only=True)
        test = {k: _metric(trainer, k) for k in ("test/acc", "test/f1", "test/loss")}
        tested = best if use_best else "the final weights of this run (no checkpoint saved)"
        if trainer.world_size == 1 and not trainer.fast_dev_run:
            plots = bool(OmegaConf.select(cfg, "report.plots", default=True))
            write_report(recorder, datamodule, model, tested, output_dir, test, precision, plots=plots)
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
        "extraction": feature_cache.extraction_summary() if feature_cache else None,
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


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}.{key}").items()}
    return {prefix: node}


def note_experiment_overrides(cfg: DictConfig) -> None:
    """Log one line when experiment=X replaces values of a group chosen on the same command line.

    The experiment is applied after the groups (so it can set anything), and a group choice such as
    model=resnet18 is not a value override, so the experiment's values win over it without a word.
    """
    hc = HydraConfig.get()
    experiment = hc.runtime.choices.get("experiment")
    overrides = list(hc.overrides.task)

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    chosen = [o for o in overrides if key(o) != "experiment" and key(o) in hc.runtime.choices]
    if experiment in (None, "null") or not chosen:
        return
    try:
        without = hydra.compose(hc.job.config_name, overrides=[o for o in overrides if key(o) != "experiment"])
    except Exception:  # only a note: never what stops a run
        log.debug("could not compose the config without experiment=%s", experiment, exc_info=True)
        return
    replaced = []
    for choice in chosen:
        path = key(choice).replace("/", ".")
        mine = _leaves(OmegaConf.to_container(OmegaConf.select(without, path) or {}), path)
        final = _leaves(OmegaConf.to_container(OmegaConf.select(cfg, path) or {}), path)
        replaced += [(choice, k, mine.get(k), v) for k, v in final.items() if mine.get(k) != v]
    if replaced:
        log.warning(
            "experiment=%s replaces values your %s set: %s; to keep one, pass it as a value (e.g. %s=%s)",
            experiment,
            " ".join(dict.fromkeys(c for c, *_ in replaced)),
            ", ".join(f"{k} {mine} -> {final}" for _, k, mine, final in replaced),
            replaced[0][1],
            replaced[0][2],
        )


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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float:
    start = time.time()
    multirun = _is_multirun()
    with exit_on_user_error(hydra_run=True):
        try:
            validate_config(cfg)  # a refused config says only that (train() checks again, cheaply)
            note_experiment_overrides(cfg)
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
