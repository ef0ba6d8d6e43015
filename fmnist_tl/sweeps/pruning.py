"""Pruning: a sweep trial reports its objective after each validation epoch and stops when the
study's pruner says it cannot win (docs/sweeps.md, "Pruning").

- **The pruner** (`PrunerFactory`): `hydra.sweeper.pruner`, a `_target_` config like the sampler
  (any `optuna.pruners.*`), or null for none. Optuna does not store the pruner in the study, so
  the sweeper and every job build the same one from the config.
- **The job reaches its trial through the study storage.** The sweeper adds one override to each
  trial, `+callbacks.optuna_trial={...}` (`trial_callback_override`): storage, study name, trial
  number, the objective and the pruner's config. Lightning builds `TrialPruning` from it like any
  configured callback; a job in another process (joblib, submitit, SLURM) opens the storage itself.
  `storage=memory` is reached only in the sweeper's own process (study.py, `IN_PROCESS`).
- **What is reported** at step k (epochs done) is the best objective so far: what the trial would
  return if it stopped there (train returns the best checkpoint's value), so pruners compare like
  with like, and a pruned trial's last value is its best checkpoint's.
- **A pruned trial stops cleanly**: the callback sets `trainer.should_stop`, so the job tests its
  best checkpoint and writes metrics.json with `status: pruned` and `pruned_at_epoch`
  (`pruned_epoch`), and the sweeper tells it PRUNED (`PRUNED_AT` user attr). Under DDP rank 0
  reports and decides, and the decision is broadcast so every rank stops after the same epoch.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.core import FmnistError

log = logging.getLogger(__name__)

PRUNED_AT = "pruned_at_epoch"  # trial user attr and metrics.json key: epochs trained when it was pruned
# trainer.callback_metrics key: comes back from ddp_spawn's processes, unlike the callback's own state.
PRUNED_METRIC = "sweep/pruned_at_epoch"
CALLBACK_KEY = "optuna_trial"  # under `callbacks`: the override the sweeper adds (and the summary hides)


def pruner_config(cfg: Any) -> dict[str, Any] | None:
    """hydra.sweeper.pruner as a plain dict, or None for no pruning."""
    if cfg is None:
        return None
    out = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if not out.get("_target_"):
        raise FmnistError(
            "hydra.sweeper.pruner needs a _target_, e.g. optuna.pruners.MedianPruner, or null for no pruning"
        )
    return out


def build_pruner(cfg: Mapping[str, Any] | None) -> Any:
    """The configured Optuna pruner (NopPruner for none); a bad target or setting is a one-line error."""
    import optuna
    from hydra.utils import get_class, instantiate

    if cfg is None:
        return optuna.pruners.NopPruner()
    target = cfg["_target_"]
    try:
        cls = get_class(target)
    except Exception as e:
        raise FmnistError(
            f"hydra.sweeper.pruner._target_={target} is not a class; give an optuna.pruners class "
            "(MedianPruner, SuccessiveHalvingPruner, HyperbandPruner, ...) or pruner=null"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise FmnistError(f"hydra.sweeper.pruner._target_={target} is not an Optuna pruner (optuna.pruners.*)")
    accepted = inspect.signature(cls).parameters
    extra = sorted(k for k in cfg if not k.startswith("_") and k not in accepted)
    if extra and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise FmnistError(
            f"hydra.sweeper.pruner: {cls.__name__} takes no {', '.join(extra)} "
            f"(it takes {', '.join(accepted) or 'nothing'})"
        )
    try:
        return instantiate(dict(cfg), _convert_="all")
    except Exception as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise FmnistError(f"hydra.sweeper.pruner: cannot build {target} ({first})") from e


def _quoted(text: str) -> str:
    """A string as a quoted value in Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_callback_override(storage: str, study_name: str, trial_number: int, monitor: str) -> str:
    """The override that adds `TrialPruning` for one trial to the job's callbacks.

    The pruner's config is the job's own `hydra.sweeper.pruner`, so it is written once, in the config.
    """
    fields = {
        "_target_": "fmnist_tl.sweeps.TrialPruning",
        "storage": _quoted(storage),
        "study_name": _quoted(study_name),
        "trial_number": str(trial_number),
        "monitor": _quoted(monitor),
        "pruner": "${hydra:sweeper.pruner}",
        # The pruner arrives as its config (built in the job); Hydra must not build it first.
        "_recursive_": "false",
    }
    return f"+callbacks.{CALLBACK_KEY}={{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}"


class TrialPruning(L.Callback):
    """Reports the objective to the sweep's trial after each validation epoch and stops the fit when
    the pruner says so (see the module doc). Added by the Optuna sweeper, not configured by hand."""

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str, pruner: Any = None) -> None:
        self.storage_spec, self.study_name, self.trial_number = str(storage), str(study_name), int(trial_number)
        self.monitor = str(monitor)
        self.pruner_cfg = pruner_config(pruner)
        self.pruner = build_pruner(self.pruner_cfg)
        self._trial: Any = None
        self._maximize = True
        self.best: float | None = None
        self.pruned_at: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks into new processes; rank 0 opens the storage there itself.
        return {**self.__dict__, "_trial": None}

    def trial(self) -> Any:
        """This job's Optuna trial, through the study storage (opened once per job)."""
        if self._trial is None:
            import optuna

            from fmnist_tl.sweeps.study import open_storage

            storage = open_storage(self.storage_spec, self.study_name)
            # A plain sampler: the job only reports and asks the pruner; it samples nothing.
            study = optuna.load_study(
                study_name=self.study_name,
                storage=storage,
                pruner=self.pruner,
                sampler=optuna.samplers.RandomSampler(),
            )
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, self.trial_number)
            self._maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def step(self, epoch: int, value: float | None, last: bool = False) -> bool:
        """Report the best value so far at `epoch` (epochs trained) and ask the pruner: True to stop.

        After the `last` epoch the trial is done anyway: it is reported, not pruned.
        """
        trial = self.trial()
        if value is not None and math.isfinite(value):
            if self.best is None or (value > self.best if self._maximize else value < self.best):
                self.best = value
        if self.best is None:  # nothing finite yet: no value to compare, let early stopping judge it
            return False
        trial.report(self.best, epoch)
        if last or not trial.should_prune():
            return False
        self.pruned_at = epoch
        trial.set_user_attr(PRUNED_AT, epoch)
        log.info("Trial %d pruned after epoch %d (%s so far %.4f)", self.trial_number, epoch, self.monitor, self.best)
        return True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self.pruned_at is not None:
            return
        epoch = trainer.current_epoch + 1
        stop = False
        if trainer.is_global_zero:
            metric = trainer.callback_metrics.get(self.monitor)
            last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
            stop = self.step(epoch, None if metric is None else float(metric), last)
        stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            self.pruned_at = epoch
            trainer.should_stop = True
            trainer.callback_metrics[PRUNED_METRIC] = torch.tensor(float(epoch))


def pruned_epoch(trainer: L.Trainer) -> int | None:
    """The epoch after which the sweep's pruner stopped this fit, or None (not pruned, or not a trial).

    Read from `trainer.callback_metrics` right after fit: that also covers ddp_spawn, whose processes
    send their metrics back but not their callbacks' state.
    """
    value = trainer.callback_metrics.get(PRUNED_METRIC)
    return None if value is None else int(value)
