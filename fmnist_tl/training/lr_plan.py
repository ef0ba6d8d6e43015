"""The optimizer and LR schedule, and the LR plan a checkpoint records so a resumed or extended run goes on from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from fmnist_tl.config import FinetuneConfig
from fmnist_tl.core import FmnistError


def head_phase_factors(scheduler: Mapping[str, Any] | None, epochs: int) -> list[float]:
    """LR multipliers of the head-only epochs of a fine-tune run, from model.scheduler run over those epochs.

    Replaying the configured scheduler on a throw-away optimizer keeps any epoch-based torch scheduler
    usable; the result is a plain list, so the phase schedule below holds no scheduler state of its own.
    """
    if not scheduler or epochs == 0:
        return [1.0] * epochs
    cfg = dict(scheduler)
    target = str(cfg.get("_target_", ""))
    if cfg.pop("interval", "epoch") != "epoch" or target.endswith(("OneCycleLR", "ReduceLROnPlateau")):
        raise FmnistError(
            f"model.scheduler={target.rsplit('.', 1)[-1]} cannot drive the head epochs of a fine-tune run; "
            "use an epoch scheduler (CosineAnnealingLR, StepLR, ...) or model.scheduler=null"
        )
    if target.endswith("CosineAnnealingLR") and cfg.get("T_max") is None:
        cfg["T_max"] = epochs
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = instantiate(cfg)(probe)
    factors = []
    for _ in range(epochs):
        factors.append(float(probe.param_groups[0]["lr"]))
        probe.step()  # a no-op (no grads); keeps torch from warning that the scheduler stepped first
        schedule.step()
    return factors


def finetune_phase_factor(epoch_in_phase: int, phase_epochs: int, warmup_epochs: int, schedule: str) -> float:
    """The fine-tune phase's own LR multiplier: linear warm-up, then constant or a half cosine that ends above 0."""
    if epoch_in_phase < warmup_epochs:
        return (epoch_in_phase + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return 1.0
    return cosine_from(epoch_in_phase, warmup_epochs, 1.0, warmup_epochs + max(1, phase_epochs - warmup_epochs))


def cosine_from(epoch: int, start: int, factor: float, end: int, floor: float = 0.0) -> float:
    """A half cosine: `factor` at epoch `start`, `floor` at epoch `end` and after."""
    span = max(1, end - start)
    return floor + (factor - floor) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - start, span) / span))


def schedule_kind(scheduler: Mapping[str, Any] | None, finetune_start: int | None) -> str | None:
    """Which LR schedule a model config trains with: the fine-tune phase's own (when `finetune_start`
    is an epoch), a torch scheduler's name, or None."""
    if finetune_start is not None:
        return "finetune"
    if not scheduler:
        return None
    return str(scheduler.get("_target_", "")).rsplit(".", 1)[-1] or None


class LRPlan:
    """The part of an LR schedule that follows trainer.max_epochs, recorded in every checkpoint.

    `state` is what a checkpoint holds: the scheduler kind, the max_epochs the schedule currently
    ends at, and any re-plans. A resumed run with the checkpoint's max_epochs (an interrupted run)
    keeps the plan, so it trains with exactly the LRs of an uninterrupted run. A resumed run with
    another max_epochs (an extended run) re-plans: a half cosine from the multiplier of the last
    trained epoch down to `floor` at the new end, so the LR goes on from where it was and never
    jumps back up or cycles (a restored CosineAnnealingLR would keep the old T_max and cycle).

    `fresh(epoch, max_epochs)` is the multiplier as first planned, None for schedules that do not
    depend on max_epochs (constant, StepLR, a fixed T_max); those are never re-planned. Up to epoch
    `cosine_start` a fresh plan's multipliers do not depend on max_epochs, so a resume from there
    simply plans afresh for the new end.
    """

    def __init__(
        self,
        kind: str | None,
        max_epochs: int,
        fresh: Callable[[int, int], float] | None = None,
        floor: float = 0.0,
        cosine_start: float = 0,
        total_steps: int | None = None,
    ) -> None:
        self.fresh, self.floor, self.cosine_start = fresh, floor, cosine_start
        self.state: dict[str, Any] = {
            "scheduler": kind,
            "max_epochs": max_epochs,
            "first_max_epochs": max_epochs,
            "replans": [],
            "total_steps": total_steps,
        }

    def factor(self, epoch: int) -> float:
        for start, factor, end in reversed(self.state["replans"]):
            if epoch >= start:
                return cosine_from(epoch, start, factor, end, self.floor)
        return self.fresh(epoch, self.state["first_max_epochs"])

    def adopt(self, saved: Mapping[str, Any] | None, epoch: int, max_epochs: int) -> int | None:
        """Continue the checkpoint's plan from `epoch`; re-plan it to end at `max_epochs` when that
        changed. Returns the checkpoint's max_epochs when it re-planned, else None."""
        if saved is None:  # a fresh run
            return None
        self.state = {**self.state, **dict(saved), "replans": [list(r) for r in saved.get("replans", [])]}
        planned = int(self.state["max_epochs"])
        if planned == max_epochs or epoch >= max_epochs:
            return None
        self.state["max_epochs"] = max_epochs
        if self.fresh is None:
            return planned
        last_trained = max(epoch - 1, 0)
        if not self.state["replans"] and last_trained <= self.cosine_start:
            self.state["first_max_epochs"] = max_epochs
        else:
            self.state["replans"].append([last_trained, self.factor(last_trained), max_epochs])
        return planned

    def resume(self, saved: Mapping[str, Any] | None, trainer: Any) -> str | None:
        """Take over a resumed checkpoint's plan (`saved`; None for a fresh run), re-planned when
        trainer.max_epochs changed, and set the LRs of the trainer's current epoch from it.
        Returns the line to log when the run's end moved, else None."""
        epoch, end = trainer.current_epoch, max(1, int(trainer.max_epochs or 1))
        planned = self.adopt(saved, epoch, end)
        if trainer.lr_scheduler_configs:
            self.set_lrs(trainer.lr_scheduler_configs[0].scheduler, epoch)
        if planned is None:
            return None
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        how = (
            f"the LR schedule is re-planned: from lr {lr:.3g} in epoch {epoch + 1} down to the end of its cosine "
            f"after epoch {end}"
            if self.fresh is not None
            else f"the LR schedule ({self.state['scheduler'] or 'constant'}) does not depend on it"
        )
        change = "Extending" if end > planned else "Shortening"
        return f"{change} the run from trainer.max_epochs={planned} (as the checkpoint planned) to {end}: {how}"

    def set_lrs(self, scheduler: Any, epoch: int) -> None:
        """Put the LRs of `epoch` into a LambdaLR driven by this plan (its restored LRs are the old plan's)."""
        if self.fresh is None:
            return
        scheduler.last_epoch = epoch
        for group, base, fn in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def legacy_lr_plan(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan of a checkpoint written before checkpoints recorded one, where its scheduler state tells.

    Such a checkpoint's default cosine is a CosineAnnealingLR state; the LambdaLR that now runs that
    schedule loads it once it has LambdaLR's one extra key.
    """
    states = checkpoint.get("lr_schedulers") or []
    if len(states) != 1 or "T_max" not in states[0]:
        return None
    states[0].setdefault("lr_lambdas", [None] * len(states[0].get("base_lrs", [])))
    t_max = int(states[0]["T_max"])
    return {"scheduler": "CosineAnnealingLR", "max_epochs": t_max, "first_max_epochs": t_max, "replans": []}


def _with_scheduler(optimizer: Any, scheduler: Any, interval: str = "epoch") -> dict[str, Any]:
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def configure_optimization(
    params: Iterable[nn.Parameter],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None,
    max_epochs: int,
    total_steps: Callable[[], int],
) -> tuple[Any, LRPlan]:
    """Lightning's configure_optimizers result for a run without a fine-tune phase, and its LR plan.

    `total_steps` is called only for a one-cycle schedule (its end is fixed in steps).
    """
    opt_cfg = dict(optimizer)
    built = instantiate(opt_cfg)(list(params))
    kind = schedule_kind(scheduler, None)
    plan = LRPlan(kind, max_epochs)
    if not scheduler:
        return built, plan
    sched_cfg = dict(scheduler)
    interval = sched_cfg.pop("interval", "epoch")
    if kind == "OneCycleLR":
        sched_cfg.setdefault("max_lr", opt_cfg["lr"])
        sched_cfg.setdefault("total_steps", int(total_steps()))
        plan.state["total_steps"] = sched_cfg["total_steps"]
        interval = "step"
    elif kind == "CosineAnnealingLR" and sched_cfg.get("T_max") is None and interval == "epoch":
        # CosineAnnealingLR over trainer.max_epochs, as a function of the epoch that a resumed
        # run can re-plan (see LRPlan); the same LRs as torch's closed form.
        floor = float(sched_cfg.get("eta_min", 0.0)) / float(opt_cfg["lr"])
        plan = LRPlan(kind, max_epochs, lambda epoch, end: cosine_from(epoch, 0, 1.0, end, floor), floor)
        return _with_scheduler(built, torch.optim.lr_scheduler.LambdaLR(built, lambda e: plan.factor(e))), plan
    return _with_scheduler(built, instantiate(sched_cfg)(built), interval), plan


def configure_finetune_optimization(
    head: Iterable[nn.Parameter],
    backbone: Iterable[nn.Parameter],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None,
    ft: FinetuneConfig,
    max_epochs: int | None,
) -> tuple[Any, LRPlan]:
    """Both param groups from the first step, the backbone's at LR 0 until the fine-tune phase starts.

    Adding a group at the unfreeze epoch breaks resuming (the saved optimizer has more groups than
    the rebuilt one, Lightning issues 6891/8502) and DDP (which fixes its parameter set when it
    wraps the model, issue 20340); a fixed set of groups with a phase-aware LR avoids both.
    """
    start = int(ft.first_epoch)
    opt_cfg = dict(optimizer)
    head_lr = float(opt_cfg["lr"])
    phase_head_lr = float(ft.lr or head_lr)
    groups = [
        {"params": list(head), "name": "head"},
        {"params": list(backbone), "lr": phase_head_lr * ft.backbone_lr_factor, "name": "backbone"},
    ]
    built = instantiate(opt_cfg)(groups)
    head_factors = head_phase_factors(scheduler, start)
    warmup, schedule = ft.warmup_epochs, ft.schedule

    def fresh(epoch: int, max_epochs: int) -> float:
        return finetune_phase_factor(epoch - start, max(1, max_epochs - start), warmup, schedule)

    # The phase's multiplier follows trainer.max_epochs: a resumed run with another max_epochs
    # re-plans it (LRPlan). Its cosine starts after the warm-up; a constant one never depends on it.
    plan = LRPlan(
        "finetune",
        max(start + 1, int(max_epochs or start + 1)),
        fresh,
        cosine_start=start + warmup if schedule == "cosine" else math.inf,
    )

    # Plain functions: LambdaLR leaves them out of its state_dict, so checkpoints hold only numbers
    # (the plan goes into the checkpoint as lr_plan), and a resumed run rebuilds the same schedule.
    def head_lambda(epoch: int) -> float:
        return head_factors[epoch] if epoch < start else phase_head_lr / head_lr * plan.factor(epoch)

    def backbone_lambda(epoch: int) -> float:
        return 0.0 if epoch < start else plan.factor(epoch)

    return _with_scheduler(built, torch.optim.lr_scheduler.LambdaLR(built, [head_lambda, backbone_lambda])), plan


def configure_model_optimization(
    head: Iterable[nn.Parameter],
    finetune_params: list[nn.Parameter],
    trainable: list[nn.Parameter],
    hparams: Mapping[str, Any],
    ft: FinetuneConfig,
    max_epochs: int | None,
    total_steps: Callable[[], int],
) -> tuple[Any, LRPlan]:
    """configure_optimizers for TransferClassifier: two groups (head, stages to fine-tune) when the run
    has a fine-tune phase, else one group of whatever is trainable."""
    if ft.first_epoch is not None:
        return configure_finetune_optimization(
            head, finetune_params, hparams["optimizer"], hparams["scheduler"], ft, max_epochs
        )
    epochs = max(1, int(max_epochs or 1))
    return configure_optimization(trainable, hparams["optimizer"], hparams["scheduler"], epochs, total_steps)
