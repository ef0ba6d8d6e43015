"""Training curves of a run: train/val loss and accuracy per epoch, from its CSV log, as curves.png.

Lightning's CSVLogger (logger=csv, the default) writes `csv/metrics.csv` in the run dir: one row per
logging call, so an epoch's train and val values sit on different rows, between LR-monitor rows and
the test row. `read_curves` gathers them per epoch; `plot_curves` draws them, with a line where the
fine-tune phase starts (the run's `model.finetune`). A resumed run's epochs are in two or more logs:
the checkpoints record them (`curve_logs`, training/checkpoints.py), and `lineage_curves` joins them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fmnist_tl.core import atomic_write_bytes

log = logging.getLogger(__name__)

# The per-epoch columns the model logs (model.py); train/loss_step is per step and left out.
CURVE_COLUMNS = ("train/loss_epoch", "val/loss", "train/acc", "val/acc")


def png_bytes(fig: Figure) -> bytes:
    """A matplotlib Figure as PNG bytes, on an explicit Agg canvas: no GUI backend, no pyplot state."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def find_csv_log(run_dir: str | Path) -> Path | None:
    """The run's CSVLogger file: `csv/metrics.csv`, else the newest `csv/**/metrics.csv` (versioned logs)."""
    run_dir = Path(run_dir)
    direct = run_dir / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    found = sorted((run_dir / "csv").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_curves(csv_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(epoch, value), ...]} for each of CURVE_COLUMNS present, in epoch order.

    Rows without an epoch (LR monitor) and empty cells are skipped; when a column has two values
    for one epoch (a resumed run re-logging it), the last one written wins.
    """
    per_column: dict[str, dict[int, float]] = {name: {} for name in CURVE_COLUMNS}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = (row.get("epoch") or "").strip()
            if not epoch:
                continue
            for name in CURVE_COLUMNS:
                cell = (row.get(name) or "").strip()
                if cell:
                    value = float(cell)
                    if math.isfinite(value):
                        per_column[name][int(float(epoch))] = value
    return {name: sorted(values.items()) for name, values in per_column.items() if values}


def lineage_curves(curve_logs: list[Mapping[str, Any]]) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """The curves of a run over the CSV logs of its lineage (oldest first), and how many of those logs were read.

    Each earlier log counts up to its `until_epoch` (the epoch of the checkpoint the next run resumed);
    an epoch logged again by a later run (one resumed mid-epoch) takes the later run's values.
    """
    merged: dict[str, dict[int, float]] = {name: {} for name in CURVE_COLUMNS}
    read = 0
    for entry in curve_logs:
        path, until = Path(entry["csv"]), entry.get("until_epoch")
        if not path.is_file():
            log.info("curves.png: %s is gone; the epochs it logged are missing from the plot", path)
            continue
        read += 1
        for name, points in read_curves(path).items():
            merged[name].update((epoch, value) for epoch, value in points if until is None or epoch <= until)
    return {name: sorted(values.items()) for name, values in merged.items() if values}, read


def run_dir_of_checkpoint(checkpoint: str | Path) -> Path | None:
    """The training run dir a checkpoint lies in (`<run>/checkpoints/x.ckpt`), or None for a file elsewhere."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def plot_curves(curves: Mapping[str, list[tuple[int, float]]], finetune_start: int | None, title: str) -> bytes:
    """Loss and accuracy per epoch (epochs counted from 1, as the progress bar does), side by side, as PNG."""
    return png_bytes(curves_figure(curves, finetune_start, title))


def curves_figure(curves: Mapping[str, list[tuple[int, float]]], finetune_start: int | None, title: str) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    fig.suptitle(title)
    panels = (("loss", ("train/loss_epoch", "val/loss")), ("accuracy", ("train/acc", "val/acc")))
    for i, (ylabel, names) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in names:
            points = curves.get(name, [])
            if points:
                label = "train" if name.startswith("train") else "val"
                ax.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
        if finetune_start is not None:
            # Epoch k (0-based) is the first to train the backbone: the line sits just before it.
            ax.axvline(
                finetune_start + 0.5, color="grey", linestyle="--", label=f"fine-tune from epoch {finetune_start + 1}"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        # Whole epochs only, also for one or two epochs (where matplotlib would tick 0.96 ... 1.04).
        epochs = [e + 1 for points in curves.values() for e, _ in points]
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def write_curves(
    run_dir: str | Path | None,
    output_dir: str | Path,
    finetune_start: int | None,
    curve_logs: list[Mapping[str, Any]] | None = None,
) -> Path | None:
    """curves.png in output_dir; None (and one log line) when there is none to plot.

    From `curve_logs` (a checkpoint's lineage: a resumed run's epochs span several runs' logs) when
    given, else from run_dir's CSV log (checkpoints written before checkpoints recorded their logs).
    """
    runs = 1
    if curve_logs:
        curves, runs = lineage_curves(curve_logs)
        source: Any = ", ".join(str(entry["csv"]) for entry in curve_logs)
    else:
        csv_path = find_csv_log(run_dir) if run_dir is not None else None
        if csv_path is None:
            log.info("no curves.png: %s has no CSV log (csv/metrics.csv; logger=csv writes it)", run_dir)
            return None
        curves, source = read_curves(csv_path), csv_path
    if not curves:
        log.info("no curves.png: %s holds no per-epoch train/val metrics", source)
        return None
    epochs = max(e for points in curves.values() for e, _ in points) + 1
    # The run that wrote the last epochs (a resumed run checkpoints into the folder of the run it resumed).
    name = Path(str(curve_logs[-1]["csv"])).parent.parent.name if curve_logs else Path(str(run_dir)).name
    title = f"Training curves of {name} ({epochs} epochs" + (f", in {runs} runs)" if runs > 1 else ")")
    out = Path(output_dir) / "curves.png"
    atomic_write_bytes(out, plot_curves(curves, finetune_start, title))
    return out
