"""What the commands share: the task wrapper, the config checks, building the config's objects."""

from fmnist_tl.runtime.build import build, cpu_precision_probe, finetune_trainer_overrides, instantiate_group
from fmnist_tl.runtime.checks import check_logger_dependencies, config_hash, validate_config
from fmnist_tl.runtime.task import USER_FULL_ERROR_ENV, exit_on_user_error, full_error_wanted, run_hydra_cli

__all__ = [
    "build",
    "check_logger_dependencies",
    "config_hash",
    "cpu_precision_probe",
    "exit_on_user_error",
    "finetune_trainer_overrides",
    "full_error_wanted",
    "instantiate_group",
    "run_hydra_cli",
    "USER_FULL_ERROR_ENV",
    "validate_config",
]
