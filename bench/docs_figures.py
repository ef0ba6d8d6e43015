"""Regenerate a figure of the docs with the command printed beside it: `python -m bench.docs_figures sweep`.

Every figure in docs/ comes from the command shown next to it. This runs that command as a user
would, from the repository root with `FMNIST_ROOT` set to a scratch folder (so its logs, data copy
and caches stay out of the checkout), then copies the figure into docs/. tests/test_docs.py checks
that the page shows the command this runs, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Figure:
    command: str  # as the page shows it
    output: str  # the figure, relative to FMNIST_ROOT
    target: str  # where it goes, relative to the repository
    page: str  # the page that shows it beside the command


FIGURES = {
    # A small head search (resnet18 at 32 px, random init, a 3000-image subset): minutes on a laptop CPU.
    "sweep": Figure(
        command="python -m fmnist_tl.train -m hparams_search=head_optuna model=resnet18 model.weights=null "
        "model.image_size=32 data.train_subset=3000 data.val_size=1000 data.test_subset=1000 "
        "hydra.sweeper.n_trials=12",
        output="logs/train/studies/head_optuna/sweep_summary.png",
        target="docs/sweep_summary_head_optuna.png",
        page="docs/sweeps.md",
    ),
}


def regenerate(name: str, scratch: Path) -> Path:
    """Run figure `name`'s command in `scratch` and copy its figure into docs/; returns the target."""
    figure = FIGURES[name]
    args = shlex.split(figure.command)
    assert args[:2] == ["python", "-m"], figure.command
    started = time.perf_counter()
    subprocess.run([sys.executable, *args[1:]], cwd=REPO, env={**os.environ, "FMNIST_ROOT": str(scratch)}, check=True)
    target = REPO / figure.target
    shutil.copyfile(scratch / figure.output, target)
    print(f"{figure.target}: from `{figure.command}` in {time.perf_counter() - started:.0f} s")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.docs_figures", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(FIGURES))
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    for name in args.names:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            regenerate(name, args.keep.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="fmnist-docs-figure-") as scratch:
                regenerate(name, Path(scratch))


if __name__ == "__main__":
    main()
