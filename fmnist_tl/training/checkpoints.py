"""Which checkpoint a run resumes from, and the checks that refuse one before training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
