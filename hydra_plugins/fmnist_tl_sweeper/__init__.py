"""Hydra plugin: the Optuna sweeper of fmnist_tl (`hydra.sweeper._target_` in conf/hparams_search/).

Hydra only instantiates plugin classes defined under the `hydra_plugins` namespace package; the
logic lives in `fmnist_tl.sweeper`. Optuna takes seconds to import, so it is imported only when
this sweeper is actually used, not when Hydra scans its plugins at every start.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class FmnistOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's config and search-space syntax; failed trials are told FAIL, never fatal."""

    def __init__(self, **config: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

        self.impl = OptunaSweeperImpl(**config)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from fmnist_tl.sweeper import run_study
        from fmnist_tl.utils import exit_on_user_error

        with exit_on_user_error():  # a bad sweeper setting: one line, exit 2, like train's own errors
            run_study(self.impl, arguments)
