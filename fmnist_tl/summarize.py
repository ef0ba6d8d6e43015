"""One table for a whole sweep: `python -m fmnist_tl.summarize [SWEEP_DIR]`.

Writes sweep_summary.{csv,md,png} (fmnist_tl/sweeps/summary.py) for a sweep dir, including one still
running or interrupted, and prints the markdown table; without SWEEP_DIR, for the sweep started
last under paths.log_dir: a multirun (`<task>/multiruns/<time>`) or an Optuna study
(`<task>/studies/<study_name>`, conf/hparams_search/). Every multirun also writes it when it ends
(SweepSummaryCallback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from fmnist_tl.config import compose_config
from fmnist_tl.core import FmnistError
from fmnist_tl.runtime import task_wrapper
from fmnist_tl.sweeps import MD_NAME, write_summary

# How conf/hydra/default.yaml names a sweep dir: the time the sweep started (older runs: no %f).
SWEEP_DIR_TIMES = ("%Y-%m-%d_%H-%M-%S_%f", "%Y-%m-%d_%H-%M-%S")
# Where sweeps live under paths.log_dir: multiruns (conf/hydra/default.yaml), one dir per command, and
# Optuna studies (conf/hparams_search/*.yaml), one dir per study, which every rerun of it continues.
SWEEP_GLOBS = ("*/multiruns/*", "*/studies/*")


def configured_log_dir() -> Path:
    """paths.log_dir as the train config sets it (FMNIST_ROOT honoured), from the installed configs."""
    return Path(compose_config("train").paths.log_dir)


def sweep_started(sweep_dir: Path) -> float:
    """When a sweep last started: a multirun from its dir name, else when Hydra wrote its multirun.yaml
    (never rewritten); a study dir when its newest job started (Hydra writes a job's .hydra/overrides.yaml
    as it starts it), so the study rerun last counts as started then.

    Not the dir's mtime: writing a summary into an old sweep dir would make it the newest.
    """
    for fmt in SWEEP_DIR_TIMES:
        try:
            return datetime.strptime(sweep_dir.name, fmt).timestamp()
        except ValueError:
            pass
    files = [sweep_dir / "multirun.yaml", *sweep_dir.glob("*/.hydra/overrides.yaml")]
    return max((p.stat().st_mtime for p in files if p.is_file()), default=float("-inf"))


def newest_sweep_dir(root: Path | None = None) -> Path:
    """The sweep under root (paths.log_dir) started last: a multirun or an Optuna study, whichever is newer."""
    root = configured_log_dir() if root is None else root
    found = [p for pattern in SWEEP_GLOBS for p in root.glob(pattern) if p.is_dir()]
    if not found:
        where = " or ".join(f"{root}/{pattern}/" for pattern in SWEEP_GLOBS)
        raise FmnistError(f"no sweep dirs under {where}; pass SWEEP_DIR (or --log-dir)")
    return max(found, key=lambda p: (sweep_started(p), p.name))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_tl.summarize",
        description="Write sweep_summary.{csv,md,png} for a Hydra sweep dir (also one still running or interrupted).",
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        type=Path,
        help="default: the sweep started last under LOG_DIR/*/multiruns/ or LOG_DIR/*/studies/",
    )
    parser.add_argument(
        "--log-dir", type=Path, help="where to look for sweeps; default: paths.log_dir ($FMNIST_ROOT/logs or ./logs)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib rendering)")
    args = parser.parse_args(argv)
    with task_wrapper():
        sweep_dir = args.sweep_dir or newest_sweep_dir(args.log_dir)
        write_summary(sweep_dir, plot=not args.no_plot)
        sys.stdout.write((sweep_dir / MD_NAME).read_text())


if __name__ == "__main__":
    main()
