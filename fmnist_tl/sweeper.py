"""An Optuna study for Hydra multiruns in which a failed trial never kills the study.

hydra-optuna-sweeper 1.3.0 (the newest, for optuna < 3) aborts the whole study when one trial
returns NaN: it tells Optuna `COMPLETE` with the NaN, Optuna refuses, and the fallback tells
`FAIL` *with* the NaN value, which Optuna refuses again with an uncaught ValueError
(hydra PR #2225, optuna issues #3132/#3205). Its default `max_failure_rate: 0` also re-raises the
first exception of any trial, and a study whose trials all failed crashes on `study.best_trial`.

`run_study` keeps that plugin's parsing of the search space (`hydra.sweeper.params`, same syntax
and config) and replaces only the ask/launch/tell loop: a trial that raised, returned NaN/inf or
returned nothing is told to Optuna as FAIL (TPE then ignores it) and the study goes on. The Hydra
plugin class that points here is `hydra_plugins.fmnist_tl_sweeper.FmnistOptunaSweeper` (Hydra only
instantiates plugins defined under `hydra_plugins`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from fmnist_tl.utils import FmnistError, atomic_write_text

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


def check_storage(storage: Any) -> None:
    """optuna 2.x's database storage needs SQLAlchemy 1.x; fail before any trial, with the fix."""
    if storage is None or not str(storage).startswith(("sqlite", "mysql", "postgresql")):
        return
    import optuna
    import sqlalchemy

    if int(optuna.__version__.split(".")[0]) < 3 and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        raise FmnistError(
            f"hydra.sweeper.storage={storage}: optuna {optuna.__version__} cannot use SQLAlchemy "
            f"{sqlalchemy.__version__} for database storage; pip install -e '.[optuna-db]' "
            "(SQLAlchemy<2), or keep the default in-memory study (hydra.sweeper.storage=null)"
        )


def run_study(impl: Any, arguments: Sequence[str]) -> None:
    """Run `impl.n_trials` trials in batches of `impl.n_jobs` through Hydra's launcher.

    `impl` is hydra-optuna-sweeper's OptunaSweeperImpl, already set up by Hydra.
    """
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    check_storage(impl.storage)
    impl._process_searchspace_config()
    distributions, fixed = create_params_from_overrides(impl._parse_sweeper_params_config() + list(arguments))
    distributions = {**(impl.search_space_distributions or {}), **distributions}
    for name in fixed:  # a plain `key=value` on the command line pins a searched key
        distributions.pop(name, None)
    if isinstance(impl.sampler, functools.partial):  # only the grid sampler is configured as a partial
        raise FmnistError(
            "hydra/sweeper/sampler=grid is not supported by this sweeper; "
            "for a grid, run a plain multirun: python -m fmnist_tl.train -m key=a,b key2=c,d"
        )
    directions = impl._get_directions()
    if len(directions) != 1:
        raise FmnistError(f"hydra.sweeper.direction={directions}: give one direction (train returns one objective)")
    study = optuna.create_study(
        study_name=impl.study_name,
        storage=impl.storage,
        sampler=impl.sampler,
        directions=directions,
        load_if_exists=True,
    )
    log.info("Study %s: %d trials of %s, %s", study.study_name, impl.n_trials, sorted(distributions), directions)

    launched = failed = 0
    while launched < impl.n_trials:
        trials = [study.ask() for _ in range(min(impl.n_jobs, impl.n_trials - launched))]
        overrides = impl._configure_trials(trials, distributions, fixed)
        returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
        impl.job_idx += len(returns)
        launched += len(returns)
        for trial, ret in zip(trials, returns, strict=True):
            value, why = trial_value(ret)
            if value is None:
                failed += 1
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning("Trial %d failed (told to Optuna as FAIL): %s", trial.number, why)
            else:
                study.tell(trial, values=[value])
        if failed / launched > impl.max_failure_rate:
            log.error(
                "Stopping the study: %d of %d trials failed (hydra.sweeper.max_failure_rate=%s)",
                failed,
                launched,
                impl.max_failure_rate,
            )
            break
    write_results(study, Path(impl.config.hydra.sweep.dir))


def write_results(study: Any, sweep_dir: Path) -> None:
    """optimization_results.yaml as hydra-optuna-sweeper writes it, when any trial completed."""
    import optuna

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        log.error("No trial completed; see sweep_summary.md and each job's metrics.json for why")
        return
    best = study.best_trial
    results = {
        "name": "optuna",
        "best_params": best.params,
        "best_value": best.value,
        "n_trials": len(study.trials),
        "n_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
    }
    log.info("Best parameters: %s", best.params)
    log.info("Best value: %s", best.value)
    atomic_write_text(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))
