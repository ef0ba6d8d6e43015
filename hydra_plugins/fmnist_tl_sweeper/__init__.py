"""Hydra plugin: fmnist_tl's Optuna sweeper (`hydra/sweeper=optuna`), its samplers (`hydra/sweeper/sampler=...`)
and pruners (`hydra/sweeper/pruner=...`).

The same config keys and search-space syntax as hydra-optuna-sweeper, on current Optuna (ask/tell);
the sweep itself is `fmnist_tl.sweeps.sweeper.run_study`. Hydra imports every module under `hydra_plugins`
at start-up, which registers the configs below; Optuna takes a second or two to import, so it is
imported only when this sweeper actually runs.

hydra-optuna-sweeper registers the same config names (and pins optuna < 3): do not install both.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

# The app's top-level `seed` when it has one (fmnist_tl's train config does), else unseeded.
APP_SEED = "${oc.select:seed,null}"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.fmnist_tl_sweeper.FmnistOptunaSweeper"
    # The sweeper gets the sampler's config, not a sampler: it builds one per trial
    # (fmnist_tl.sweeps.search_space.SamplerFactory).
    _recursive_: bool = False
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    # An Optuna sampler as a _target_ config (hydra/sweeper/sampler=tpe|random|cmaes|gp|qmc|nsgaii|grid).
    sampler: Any = MISSING
    # minimize or maximize (one objective). null: from the app's objective.mode (max -> maximize,
    # min -> minimize; fmnist_tl's conf/train.yaml), else minimize. A direction given here must agree with it.
    direction: Any = None
    # null: the job name (`train`).
    study_name: Any = None
    # null: SQLite in the sweep dir, <hydra.sweep.dir>/<study_name>.db. Or any SQLAlchemy URL
    # (postgresql://user@host/db, mysql+pymysql://..., sqlite:///path.db), journal:<path> (Optuna's
    # journal file, also on NFS), or memory (a throw-away study).
    storage: Any = None
    # The study's total: every worker on the study stops once this many trials are done or running.
    n_trials: int = 20
    # Trials asked and launched together (a parallel launcher runs them at once).
    n_jobs: int = 1
    # Stop this worker once more than this fraction of its trials failed; 1.0 never stops.
    max_failure_rate: float = 1.0
    # The search space in Hydra's override grammar, e.g. model.optimizer.lr: tag(log, interval(1e-4, 1e-2)).
    params: Any = None
    # Seconds between heartbeats of a running trial, and the silence after which another worker
    # counts it lost (workers on the same machine are checked by pid at once instead).
    heartbeat_interval: int = 60
    grace_period: int = 600
    # An Optuna pruner as a _target_ config (hydra/sweeper/pruner=none|median|percentile|successive_halving|
    # hyperband, or any optuna.pruners class with its arguments); with none (or null) trials still report
    # each epoch, and none is stopped. Not stored in the study: every worker and job builds it from this config.
    pruner: Any = MISSING


# Samplers as plain _target_ configs (not dataclasses), so a setting of one sampler in a config
# (head_optuna's TPE n_startup_trials) does not stop the user from picking another on the command
# line: the sweeper leaves out, with a warning, settings the chosen sampler does not take.
SAMPLERS: dict[str, dict[str, Any]] = {
    # constant_liar (Optuna's default): running trials count as bad guesses, so parallel workers spread out.
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": APP_SEED, "n_startup_trials": 10, "constant_liar": True},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": APP_SEED},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": APP_SEED, "n_startup_trials": 1},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": APP_SEED, "n_startup_trials": 10},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": APP_SEED, "qmc_type": "sobol"},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": APP_SEED, "population_size": 50},
    # The grid: every value of each searched key (choice, range, int(interval)); n_trials caps it.
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": APP_SEED},
}

# Pruners as _target_ configs; choosing one replaces the settings of another (a config group).
PRUNERS: dict[str, dict[str, Any]] = {
    "none": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 2},
    "percentile": {
        "_target_": "optuna.pruners.PercentilePruner",
        "percentile": 25.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 2,
    },
    # head_optuna's pruner (bench/pruning.py, docs/sweeps.md): every trial gets 2 epochs before its
    # first judgement, as trials judged after one lost the best ones; the top third go on at 2 and 6.
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": 2,
        "reduction_factor": 3,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
}

_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="fmnist_tl")
for _name, _node in SAMPLERS.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="fmnist_tl")
for _name, _node in PRUNERS.items():
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="fmnist_tl")


class FmnistOptunaSweeper(Sweeper):
    """Optuna study over Hydra jobs: persistent, shareable by many workers, failed trials never fatal."""

    def __init__(self, **config: Any) -> None:
        from fmnist_tl.sweeps import SweepSettings

        self.settings = SweepSettings(**config)
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        from fmnist_tl.runtime import task_wrapper
        from fmnist_tl.sweeps import run_study

        with task_wrapper():  # a bad sweeper setting: one line, exit 2, like train's own errors
            run_study(self, arguments)
