"""What the commands share: the task wrapper, the config checks, building and recording a run."""

from fmnist_tl.runtime.build import (
    build,
    build_model,
    build_trainer,
    cpu_precision_probe,
    finetune_trainer_overrides,
    instantiate_group,
)
from fmnist_tl.runtime.checks import check_accelerator, check_logger_dependencies, config_hash, validate_config
from fmnist_tl.runtime.record import (
    record_failed_job,
    run_metrics,
    run_test,
    set_aside_previous_run,
    summarize_stopped_sweep,
    write_run_record,
)
from fmnist_tl.runtime.serving import OnnxClassifier, UInt8Classifier, channels_last_input, export_layout
from fmnist_tl.runtime.task import Stop, full_error_wanted, run_hydra_cli, stop_of, task_wrapper

__all__ = [
    "build",
    "build_model",
    "build_trainer",
    "check_accelerator",
    "channels_last_input",
    "check_logger_dependencies",
    "config_hash",
    "cpu_precision_probe",
    "export_layout",
    "finetune_trainer_overrides",
    "full_error_wanted",
    "instantiate_group",
    "OnnxClassifier",
    "record_failed_job",
    "run_hydra_cli",
    "run_metrics",
    "set_aside_previous_run",
    "Stop",
    "stop_of",
    "summarize_stopped_sweep",
    "task_wrapper",
    "UInt8Classifier",
    "run_test",
    "validate_config",
    "write_run_record",
]
