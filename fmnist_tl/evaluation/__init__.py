"""The test report (metrics, confusion matrix, mistakes) and the training curves."""

from fmnist_tl.evaluation.curves import finetune_start_of, run_dir_of_checkpoint, saved_config
from fmnist_tl.evaluation.report import write_report

__all__ = [
    "finetune_start_of",
    "run_dir_of_checkpoint",
    "saved_config",
    "write_report",
]
