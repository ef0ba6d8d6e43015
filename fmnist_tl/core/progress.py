"""Progress bars: Lightning's RichProgressBar made to read well on one line (training), and the
images-per-second bar of feature extraction (torch and ONNX Runtime alike)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn, CustomTimeColumn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# What the bar shows, under the names it shows them by; every metric is in the loggers' files anyway.
BAR_METRICS = {"train/loss_step": "loss", "val/acc": "val/acc"}


class SpeedColumn(ProgressColumn):
    """Batches per second; for a task too short for rich to measure (one batch), its overall rate.

    Lightning's column prints 0.00it/s then (fast_dev_run, a DDP rank's single test batch).
    """

    def __init__(self, style: Any) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        speed = task.speed
        if speed is None and task.finished and task.finished_time:
            speed = task.completed / task.finished_time
        return Text("" if speed is None else f"{speed:.1f}it/s", style=self.style)


class EpochProgressBar(RichProgressBar):
    """Epochs counted from 1 out of trainer.max_epochs ("Epoch 1/1" for one epoch, where Lightning
    shows 0/0), the train loss and val/acc only, and a bar that shrinks so the line fits 100
    columns (the other metrics wrapped onto 3-4 lines, in terminals and in log files alike).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        description = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        # As Lightning does: padded to the validation bar's label, so the two do not flicker.
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return {shown: metrics[name] for name, shown in BAR_METRICS.items() if name in metrics}

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            # bar_width=None: the bar takes what the other columns leave of the line.
            CustomBarColumn(
                bar_width=None,
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomTimeColumn(style=self.theme.time),
            SpeedColumn(style=self.theme.processing_speed),
        ]


class RateColumn(ProgressColumn):
    """Images per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.1f} img/s", style="progress.data.speed")


def progress_bar(enabled: bool) -> Progress:
    """The bar of one feature extraction pass: images done, img/s, time spent and left."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
