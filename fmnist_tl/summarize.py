"""One table for a whole sweep: `python -m fmnist_tl.summarize [SWEEP_DIR]`.

Writes sweep_summary.{csv,md,png} (fmnist_tl/sweeps/summary.py) for a sweep dir, including one still
running or interrupted, and prints the markdown table; without SWEEP_DIR, for the sweep started
last under paths.log_dir. Every multirun also writes it when it ends (SweepSummaryCallback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from fmnist_tl.core import FmnistError
from fmnist_tl.runtime import task_wrapper
from fmnist_tl.sweeps import MD_NAME, write_summary

# How conf/hydra/default.yaml names a sweep dir: the time the sweep started (older runs: no %f).
SWEEP_DIR_TIMES = ("%Y-%m-%d_%H-%M-%S_%f", "%Y-%m-%d_%H-%M-%S")


def configured_log_dir() -> Path:
    """paths.log_dir as conf/paths/default.yaml sets it for train (FMNIST_ROOT honoured)."""
    conf = Path(__file__).resolve().parent.parent / "conf" / "paths" / "default.yaml"
    return Path(OmegaConf.create({"paths": OmegaConf.load(conf)}).paths.log_dir)


def sweep_started(sweep_dir: Path) -> float:
    """When a sweep started: from its dir name, else when Hydra wrote its multirun.yaml (never rewritten).

    Not the dir's mtime: writing a summary into an old sweep dir would make it the newest.
    """
    for fmt in SWEEP_DIR_TIMES:
        try:
            return datetime.strptime(sweep_dir.name, fmt).timestamp()
        except ValueError:
            pass
    started = sweep_dir / "multirun.yaml"
    return started.stat().st_mtime if started.is_file() else float("-inf")


def newest_sweep_dir(root: Path | None = None) -> Path:
    root = configured_log_dir() if root is None else root
    found = [p for p in root.glob("*/multiruns/*") if p.is_dir()]
    if not found:
        raise FmnistError(f"no sweep dirs under {root}/*/multiruns/; pass SWEEP_DIR (or --log-dir)")
    return max(found, key=lambda p: (sweep_started(p), p.name))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_tl.summarize",
        description="Write sweep_summary.{csv,md,png} for a Hydra sweep dir (also one still running or interrupted).",
    )
    parser.add_argument(
        "sweep_dir", nargs="?", type=Path, help="default: the sweep started last under LOG_DIR/*/multiruns/"
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
