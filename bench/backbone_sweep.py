"""A backbone sweep as a results file:
`python -m bench.backbone_sweep resnet50,convnext_tiny,efficientnet_b0 [-- overrides]`.

Runs `python -m fmnist_tl.train -m model=<names> <overrides>` in a scratch root (removed afterwards
unless --workdir is given), reads the sweep's summary the way `sweep_summary.csv` is written
(fmnist_tl.sweeps.summary.job_rows), and writes bench/results/<date>-backbone-sweep.json: the date,
this command, the sweep command, the machine, the load average at start and end, and one row per
job (rank, backbone, val/test metrics, epochs, extraction img/s, wall time). The README and the
backbones page render their sweep table from the newest such file (bench/render.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.backbones import machine
from fmnist_tl.core import FmnistError, atomic_write_json
from fmnist_tl.sweeps import job_rows, summarize

REPO = Path(__file__).resolve().parent.parent
# The summary's columns that describe the run; run_dir is a scratch path and says nothing here.
DROPPED = ("run_dir", "overrides", "best")


def sweep_rows(sweep_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """The objective and one row per job of a finished sweep, ranked as its summary ranks them."""
    summary = summarize(sweep_dir)
    rows = [{k: v for k, v in row.items() if k not in DROPPED} for row in job_rows(summary)]
    return summary.objective, rows


def run(names: list[str], overrides: list[str], results_dir: Path, argv: list[str], workdir: Path | None) -> Path:
    root = workdir or Path(tempfile.mkdtemp(prefix="backbone-sweep-"))
    sweep = ["-m", f"model={','.join(names)}", *overrides]
    load_start = os.getloadavg()
    try:
        sweep_dir = root / "sweep"
        scratch = [f"paths.root_dir={root}", f"hydra.sweep.dir={sweep_dir}"]
        cmd = [sys.executable, "-m", "fmnist_tl.train", *sweep, *scratch]
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0:
            raise FmnistError(f"the sweep failed (exit {proc.returncode}); its log is above")
        if not (sweep_dir / "sweep_summary.csv").is_file():
            raise FmnistError(f"the sweep ended but wrote no sweep_summary.csv in {sweep_dir}; its log is above")
        objective, rows = sweep_rows(sweep_dir)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "date": dt.date.today().isoformat(),
        "command": "python -m bench.backbone_sweep " + shlex.join(argv),
        "sweep_command": "python -m fmnist_tl.train " + shlex.join(sweep),
        "machine": {**machine(), "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())},
        "objective": objective,
        "rows": rows,
    }
    path = results_dir / f"{report['date']}-backbone-sweep.json"
    atomic_write_json(path, report)
    print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.backbone_sweep", description="A backbone sweep, recorded.")
    parser.add_argument("backbones", help="comma-separated model config names (conf/model)")
    parser.add_argument("overrides", nargs="*", help="train overrides for every job (after --)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, help="the sweep's paths.root_dir, kept (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    names = [n for n in args.backbones.split(",") if n]
    try:
        run(names, args.overrides, args.results_dir, argv, args.workdir)
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
