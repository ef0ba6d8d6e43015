"""The Optuna sweeper's loop and studies, the search space, and the sweep summary."""

from fmnist_tl.sweeps.pruning import TrialPruning, pruned_epoch
from fmnist_tl.sweeps.results import summarize
from fmnist_tl.sweeps.summary import MD_NAME, SweepSummaryCallback, job_rows, write_summary
from fmnist_tl.sweeps.sweeper import SweepSettings, run_study

__all__ = [
    "job_rows",
    "MD_NAME",
    "pruned_epoch",
    "run_study",
    "summarize",
    "SweepSettings",
    "SweepSummaryCallback",
    "TrialPruning",
    "write_summary",
]
