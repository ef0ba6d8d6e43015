"""The test report (metrics, confusion matrix, mistakes) and the training curves."""

from fmnist_tl.evaluation.curves import run_dir_of_checkpoint
from fmnist_tl.evaluation.report import write_report

__all__ = [
    "run_dir_of_checkpoint",
    "write_report",
]
