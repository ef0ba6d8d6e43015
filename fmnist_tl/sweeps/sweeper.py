"""fmnist_tl's Optuna sweeper for Hydra multiruns (docs/sweeps.md): `run_study` is the whole sweep.

The Hydra plugin class is `hydra_plugins.fmnist_tl_sweeper.FmnistOptunaSweeper` (Hydra only
instantiates plugins defined under `hydra_plugins`). Search space and sampler: search_space.py;
the study, its storage, lock and lost trials: study.py.

- **Direction.** `hydra.sweeper.direction`, by default from the app's `objective.mode`, so the
  study, the checkpoint and early stopping rank trials the same way.
- **Outcomes.** A trial that raised, or returned NaN/inf or nothing, is told FAIL (user attr
  `failure` says why) and the study goes on. Ctrl-C or SIGTERM stops the sweep; the trials it hit
  are told FAIL without `failure`, so they count as lost, not as tried.
- **Pruning.** `hydra.sweeper.pruner` (a `_target_` config, null for none; pruning.py): each trial
  reports its objective after every validation epoch through the study storage, and a trial the
  pruner stops is told PRUNED with its last value. It counts toward n_trials and is not rerun.
- **n_trials is the study's total.** Every worker counts, under the study's lock, the trials that
  completed, were pruned, failed with a `failure`, or are running, and asks only for what is
  missing. Lost trials (their worker is gone) are not counted, so a rerun replaces them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import ListConfig, OmegaConf

from fmnist_tl.config import at_least, in_range
from fmnist_tl.core import FmnistError, atomic_write_text
from fmnist_tl.sweeps.pruning import PRUNED_AT, build_pruner, pruner_config, trial_callback_override
from fmnist_tl.sweeps.search_space import SamplerFactory, search_space
from fmnist_tl.sweeps.study import (
    FAILURE,
    HEARTBEAT,
    JOB_DIR,
    PINNED,
    WORKER,
    Heartbeat,
    StudyStore,
    counts_toward_total,
    finish_trial,
    hide_password,
    mark_lost,
    record_lost,
    worker_identity,
)

log = logging.getLogger(__name__)


def trial_value(ret: JobReturn) -> tuple[float | None, str]:
    """(finite objective, "") for a usable trial, else (None, why it failed)."""
    try:
        value = ret.return_value  # re-raises the job's exception when the job raised
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"the job returned {value} (see its metrics.json)"
    return value, ""


@dataclass
class SweepSettings:
    """hydra.sweeper as configured (see hydra_plugins/fmnist_tl_sweeper)."""

    sampler: Any
    direction: Any
    study_name: str | None
    storage: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: Any
    heartbeat_interval: float
    grace_period: float
    pruner: Any = None

    def check(self) -> None:
        for key in ("n_trials", "n_jobs"):
            at_least(1)(f"hydra.sweeper.{key}", getattr(self, key))
        in_range(0, 1)("hydra.sweeper.max_failure_rate", self.max_failure_rate)
        if not 0 < float(self.heartbeat_interval) < float(self.grace_period):
            raise FmnistError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} must be positive and below "
                f"hydra.sweeper.grace_period={self.grace_period}"
            )

    def one_direction(self, objective_mode: Any = None) -> str:
        """minimize or maximize: hydra.sweeper.direction, by default the app's objective.mode.

        An explicit direction must agree with objective.mode: the checkpoint and early stopping
        follow objective.mode, and a study ranking the other way would pick the worst trial.
        """
        from_objective = None
        if objective_mode is not None:
            from_objective = {"max": "maximize", "min": "minimize"}.get(str(objective_mode))
            if from_objective is None:
                raise FmnistError(f"objective.mode={objective_mode} must be max or min")
        direction = self.direction
        if direction is None:
            return from_objective or "minimize"  # an app without an objective: Optuna's default
        if isinstance(direction, (list, tuple, ListConfig)):
            if len(direction) != 1:
                raise FmnistError(
                    f"hydra.sweeper.direction={list(direction)}: give one direction (train returns one objective)"
                )
            direction = direction[0]
        direction = str(getattr(direction, "name", direction)).lower()
        if direction not in ("minimize", "maximize"):
            raise FmnistError(f"hydra.sweeper.direction={direction} must be minimize or maximize")
        if from_objective is not None and direction != from_objective:
            raise FmnistError(
                f"hydra.sweeper.direction={direction} contradicts objective.mode={objective_mode}, which the "
                f"checkpoint and early stopping follow; drop hydra.sweeper.direction or set "
                f"objective.mode={direction[:3]}"
            )
        return direction


def _check_study(study: Any, direction: str, distributions: Mapping[str, Any], where: str) -> None:
    """A loaded study must have the same direction and a search space its trials fit."""
    from optuna.distributions import check_distribution_compatibility

    ours = study.direction.name.lower()
    if ours != direction:
        raise FmnistError(
            f"study {study.study_name} in {where} maximises/minimises differently ({ours}, not {direction}); "
            "pick another hydra.sweeper.study_name"
        )
    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            if key in distributions:
                try:
                    check_distribution_compatibility(old, distributions[key])
                except ValueError as e:
                    raise FmnistError(
                        f"study {study.study_name} in {where} searched {key} as {old}, now {distributions[key]} "
                        f"({e}); keep its search space or pick another hydra.sweeper.study_name"
                    ) from e


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        return []
    return [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit() and (d / ".hydra").is_dir()]


def trial_overrides(trial: Any, pinned: Sequence[str], plumbing: Sequence[str] = ()) -> list[str]:
    """The job's overrides: the trial's values, the pinned ones, the sweeper's own (`plumbing`: how
    the job reaches its trial), and its own job dir (the trial number)."""
    return [
        *(f"{k}={v}" for k, v in trial.params.items()),
        *pinned,
        *plumbing,
        f"hydra.sweep.subdir={trial.number}",
    ]


def job_plumbing(config: Any, store: StudyStore, study_name: str, trial_number: int) -> list[str]:
    """What the sweeper adds to a trial's overrides besides its values.

    - `TrialPruning` (the objective reported each epoch, the pruner asked), when the app names its
      objective (`objective.metric`, as fmnist_tl's train does) and takes Lightning callbacks;
    - no on_exception.ckpt: a trial is never resumed (a rerun of the sweep replaces a lost one), so
      that checkpoint would only invite the wrong advice.
    """
    monitor = OmegaConf.select(config, "objective.metric")
    if monitor is None or "callbacks" not in config:
        return []
    out = [trial_callback_override(store.job_spec(), study_name, trial_number, str(monitor))]
    if OmegaConf.select(config, "callbacks.on_exception_checkpoint") is not None:
        out.append("callbacks.on_exception_checkpoint=null")
    return out


def _check_launcher_reaches(store: StudyStore, config: Any) -> None:
    """A memory study lives in the sweeper's process; the jobs of any launcher but the basic one do not."""
    launcher = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher", "basic")
    if store.url == "memory" and launcher != "basic" and "callbacks" in config:
        raise FmnistError(
            f"hydra.sweeper.storage=memory lives in the sweeper's process, and hydra/launcher={launcher} runs "
            "trials in other processes, which report to their trial: use hydra.sweeper.storage=null (a SQLite "
            "file in the sweep dir) or journal:<path>"
        )


def _was_pruned(study: Any, trial: Any) -> int | None:
    """The epoch at which the job's pruner stopped this trial (its user attr, set by the job), or None."""
    attrs = study._storage.get_trial_user_attrs(trial._trial_id)
    epoch = attrs.get(PRUNED_AT)
    return None if epoch is None else int(epoch)


def run_study(sweeper: Any, arguments: Sequence[str]) -> None:
    """Ask, launch and tell until the study holds `n_trials` trials that count (see the module doc).

    `sweeper` is the Hydra plugin, set up by Hydra: `settings`, `config` and `launcher`.
    """
    import optuna
    from optuna.trial import TrialState

    settings: SweepSettings = sweeper.settings
    settings.check()
    config = sweeper.config
    direction = settings.one_direction(OmegaConf.select(config, "objective.mode"))
    distributions, pinned_keys = search_space(settings.params, arguments)
    pinned = [f"{k}={v}" for k, v in pinned_keys.items()]
    sweep_dir = Path(str(config.hydra.sweep.dir))
    study_name = str(settings.study_name or config.hydra.job.name)
    make_sampler = SamplerFactory(settings.sampler, distributions)
    pruner = build_pruner(pruner_config(settings.pruner))
    n_trials = settings.n_trials
    if make_sampler.grid_size is not None and make_sampler.grid_size < n_trials:
        log.info("The grid has %d points: n_trials %d -> %d", make_sampler.grid_size, n_trials, make_sampler.grid_size)
        n_trials = make_sampler.grid_size

    store = StudyStore(settings.storage, sweep_dir, study_name)
    _check_launcher_reaches(store, config)
    where = hide_password(store.url)
    with store.lock():
        study = optuna.create_study(
            study_name=study_name,
            storage=store.storage,
            sampler=make_sampler(0),
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
        existing = study.get_trials(deepcopy=False)
        if not existing and _job_dirs(sweep_dir):
            raise FmnistError(
                f"{sweep_dir} holds job dirs of another study, but study {study_name} in {where} is new; "
                "move them away, or pass another hydra.sweep.dir (or the storage that study used)"
            )
    _check_study(study, direction, distributions, where)
    here = worker_identity()
    log.info(
        "Study %s in %s: %d trials in total (%d already in it), %s %s over %s; job dirs in %s",
        study_name,
        where,
        n_trials,
        sum(counts_toward_total(t) for t in existing),
        direction,
        OmegaConf.select(config, "objective.metric", default="the objective"),
        ", ".join(sorted(distributions)) or "nothing",
        sweep_dir,
    )
    log.info("Pruner: %s", type(pruner).__name__ if settings.pruner is not None else "none (hydra.sweeper.pruner=null)")
    if where != "memory":
        log.info("Watch it with: optuna-dashboard %s", where.removeprefix("journal:"))

    launched = failed = 0
    while True:
        with store.lock():
            mark_lost(study, here, float(settings.grace_period), sweep_dir)
            trials = study.get_trials(deepcopy=False)
            todo = n_trials - sum(counts_toward_total(t) for t in trials)
            if todo <= 0:
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if running:
                    log.info("Study %s: all %d trials asked; %d still running elsewhere", study_name, n_trials, running)
                break
            batch = []
            for i in range(min(settings.n_jobs, todo)):
                study.sampler = make_sampler(len(trials) + i)
                trial = study.ask(distributions)
                trial.set_user_attr(WORKER, here)
                trial.set_user_attr(HEARTBEAT, time.time())
                trial.set_user_attr(JOB_DIR, str(sweep_dir / str(trial.number)))
                trial.set_user_attr(PINNED, pinned)
                batch.append(trial)
        batch = _drop_surplus(study, batch, n_trials)
        if not batch:
            break
        with Heartbeat(batch, float(settings.heartbeat_interval)):
            try:
                returns = sweeper.launcher.launch(
                    [trial_overrides(t, pinned, job_plumbing(config, store, study_name, t.number)) for t in batch],
                    initial_job_idx=batch[0].number,
                )
            except BaseException as e:
                # Ctrl-C, SIGTERM (train exits after recording the job), or a launcher error: these
                # trials did not run to their end. Without a `failure` attr they do not count.
                for trial in batch:
                    finish_trial(study, trial)
                    record_lost(sweep_dir / str(trial.number), f"stopped ({type(e).__name__})")
                _stopped(study, sweep_dir, where, store, [t.number for t in batch], e)
                code = {"SIGTERM": 143, "Ctrl-C": 130}.get(_cause(e))
                if code is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                raise SystemExit(code) from e  # the advice above is the last line, not a generic one
        launched += len(returns)
        for trial, ret in zip(batch, returns, strict=True):
            value, why = trial_value(ret)
            pruned_at = _was_pruned(study, trial) if value is not None else None
            if pruned_at is not None:
                finish_trial(study, trial, pruned=True)
                log.info("Trial %d pruned after %d epochs (told PRUNED, with its last value)", trial.number, pruned_at)
                continue
            finish_trial(study, trial, value, why or None)
            if value is None:
                failed += 1
                log.warning("Trial %d failed (told to Optuna as FAIL): %s", trial.number, why)
        if failed / launched > settings.max_failure_rate:
            log.error(
                "Stopping: %d of the %d trials this worker ran failed (hydra.sweeper.max_failure_rate=%s)",
                failed,
                launched,
                settings.max_failure_rate,
            )
            break
    with store.lock():
        write_results(study, sweep_dir, where)


def _stopped(study: Any, sweep_dir: Path, where: str, store: StudyStore, numbers: list[int], e: BaseException) -> None:
    """A sweep stopped by Ctrl-C, SIGTERM or its launcher: write what each worker writes when it
    stops, and say how to go on. A trial is never resumed from a checkpoint: the study replaces it."""
    from fmnist_tl.sweeps.summary import write_summary

    try:
        with store.lock():
            write_results(study, sweep_dir, where)
        write_summary(sweep_dir)
    except Exception:  # the trials' own results are on disk; `python -m fmnist_tl.summarize` redoes this
        log.exception("could not write the results of the stopped sweep")
    trials = ", ".join(map(str, numbers))
    # Last on stderr, after the job's own line: what to do next.
    print(
        f"error: the sweep stopped ({_cause(e)}); trial {trials} told FAIL as lost. To go on, rerun the same "
        "sweep command: the study replaces the lost trial (a trial is never resumed from a checkpoint)",
        file=sys.stderr,
    )


def _cause(e: BaseException) -> str:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, SIGTERMException) or (isinstance(seen, SystemExit) and seen.code == 143):
            return "SIGTERM"
        if isinstance(seen, KeyboardInterrupt) or (isinstance(seen, SystemExit) and seen.code == 130):
            return "Ctrl-C"
        seen = seen.__cause__ or seen.__context__
    return type(e).__name__


def _drop_surplus(study: Any, batch: list[Any], n_trials: int) -> list[Any]:
    """Without a lock (an RDB other than SQLite/PostgreSQL/MySQL), two workers may ask at once: keep
    only trials whose number is within the total, and tell the others FAIL before they run."""
    earlier = [t.number for t in study.get_trials(deepcopy=False) if counts_toward_total(t)]
    keep = []
    for trial in batch:
        if sum(n < trial.number for n in earlier) < n_trials:
            keep.append(trial)
        else:
            finish_trial(study, trial)
            log.info("Trial %d not run: another worker reached the study's total first", trial.number)
    return keep


def write_results(study: Any, sweep_dir: Path, where: str) -> None:
    """optimization_results.yaml in the sweep dir: the whole study, as hydra-optuna-sweeper named its keys."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": where,
        "n_trials": len(trials),
        "n_complete": by_state["complete"],
        "n_pruned": by_state["pruned"],
        "n_failed": sum(t.state == TrialState.FAIL and FAILURE in t.user_attrs for t in trials),
        "n_lost": sum(t.state == TrialState.FAIL and FAILURE not in t.user_attrs for t in trials),
        "n_running": by_state["running"],
    }
    if not by_state["complete"]:
        log.error("No trial completed; see sweep_summary.md and each job's metrics.json for why")
    else:
        best = study.best_trial
        results = {**results, "best_params": best.params, "best_value": best.value, "best_trial": best.number}
        log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))
