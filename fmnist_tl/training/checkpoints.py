"""Which checkpoint a run resumes from, and the checks that refuse one before training."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from fmnist_tl.backbones import read_checkpoint
from fmnist_tl.config import FinetuneConfig
from fmnist_tl.core import FmnistError
from fmnist_tl.training.finetune import finetune_options
from fmnist_tl.training.lr_plan import legacy_lr_plan, schedule_kind

log = logging.getLogger(__name__)


def check_checkpoint_file(path: str) -> dict[str, Any]:
    """Refuse a checkpoint Lightning could not load safely, before any training starts."""
    return read_checkpoint(path, f"ckpt_path={path}", "pick another checkpoint", mmap=True)


def check_resume_schedule(
    cfg: DictConfig, path: str, checkpoint: dict[str, Any], finetune: FinetuneConfig | None = None
) -> None:
    """Refuse a resume whose LR schedule cannot go on from the checkpoint's, before anything is built.

    A resumed run restores the checkpoint's scheduler state, so it must be the same kind of
    schedule. An extended cosine or fine-tune schedule is re-planned (lr_plan.LRPlan); a one-cycle
    schedule has a warm-up and an end fixed in steps, so it is only resumed as planned.

    Args:
        finetune: the job's model.finetune, already parsed; None parses `cfg.model.finetune`.
    """
    saved = checkpoint.get("lr_plan") or legacy_lr_plan(checkpoint)
    if not saved:
        return
    finetune = finetune_options(finetune or cfg.model.get("finetune"), cfg.model.backbone)
    kind = schedule_kind(cfg.model.get("scheduler"), finetune.first_epoch)
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


# A checkpoint's key for its training history: [{"csv": path, "until_epoch": k}, ..., {"csv": path}], the
# CSV logs its epochs were logged to, oldest first. A resumed run's checkpoints list the resumed-from
# run's log (up to the epoch of the checkpoint it resumed: that run may have gone on past it) before
# their own, so curves.png of a resumed run or of its checkpoints shows the whole run.
CURVE_LOGS = "curve_logs"


def csv_log_of(trainer: L.Trainer) -> str | None:
    """The file the trainer's CSVLogger writes (logger=csv), as an absolute path; None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            # log_dir, not logger.experiment: the experiment exists on rank 0 only.
            return os.path.abspath(os.path.join(logger.log_dir, "metrics.csv"))
    return None


def inherited_curve_logs(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The CSV logs before a run that resumes from `checkpoint`: its history, the last log cut at its epoch."""
    logs = [dict(entry) for entry in checkpoint.get(CURVE_LOGS) or []]
    if logs:
        logs[-1]["until_epoch"] = int(checkpoint.get("epoch", 0))
    return logs


def rerun_interrupted_validation(checkpoint: dict[str, Any]) -> bool:
    """Make a fit resumed from `checkpoint` run the validation it interrupted again, in full; True if it was one.

    A checkpoint saved between two validation batches (on_exception.ckpt after SIGTERM or Ctrl-C in
    validation) reads to Lightning as a validation that finished: the resumed run skips it, so the
    epoch ends without val/acc (ModelCheckpoint and EarlyStopping cannot find their key) and the
    batches validated before the interruption, held in memory only, are lost. Marked as interrupted
    within its last batch, the validation is run again from its first batch (its loader is not resumable).
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, val = loops.get("epoch_progress"), loops.get("epoch_loop.val_loop.batch_progress")
    if not epochs or not val:
        return False
    epoch_unfinished = epochs["current"]["processed"] < epochs["current"]["started"]
    total = val["total"]
    between_batches = val["current"]["completed"] > 0 and not val.get("is_last_batch") and total["processed"] > 0
    if not (epoch_unfinished and between_batches and total["ready"] == total["started"] == total["processed"]):
        return False
    total["processed"] = total["completed"] = total["started"] - 1
    val["current"]["processed"] = val["current"]["completed"] = 0  # from the first batch: all of them again
    return True


class FitHistory:
    """The CSV logs a model's epochs were logged to (CURVE_LOGS), across the runs that resumed one another.

    A fit resumed from a checkpoint takes over that checkpoint's logs (`resume`, from the model's
    on_load_checkpoint: Lightning restores the loops after it, so an interrupted validation is also
    marked to run again there); `logs(trainer)` adds this run's own log, and is what checkpoints record.
    """

    def __init__(self, logs: list[dict[str, Any]] | None = None) -> None:
        self.inherited = [dict(entry) for entry in logs or []]

    def resume(self, checkpoint: dict[str, Any], trainer: L.Trainer | None) -> None:
        if trainer is not None and trainer.state.fn == "fit":  # not test(ckpt_path=best) after a fit
            self.inherited = inherited_curve_logs(checkpoint)
            rerun_interrupted_validation(checkpoint)

    def logs(self, trainer: L.Trainer | None = None) -> list[dict[str, Any]]:
        csv_log = csv_log_of(trainer) if trainer is not None else None
        return [*self.inherited, *([{"csv": csv_log}] if csv_log else [])]
