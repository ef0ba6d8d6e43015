"""Progress bars: Lightning's RichProgressBar made to read well on one line (training), or one plain
line per epoch where the output is not a terminal; and the images-per-second bar of feature
extraction (torch and ONNX Runtime alike)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn, CustomTimeColumn
from rich.console import Console
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
# What an epoch's plain line shows: the epoch's mean train loss, no longer the last step's.
LINE_METRICS = {"train/loss_epoch": "loss", "val/acc": "val/acc"}


def epoch_label(current_epoch: int, max_epochs: int | None) -> str:
    """`Epoch 3/10` for Lightning's current_epoch 2: epochs counted from 1, as people count them."""
    return f"Epoch {current_epoch + 1}" + (f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else "")


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

    Where the output is not a terminal (a pipe, a log file, a batch job), a bar only writes its
    redraws into the file at rich's 80 columns: there it prints one plain line per epoch instead
    (`plain`: None decides by the console, True/False forces it), and one per test or predict pass.
    """

    def __init__(self, plain: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plain = plain
        self._pass_started = 0.0
        self._pass_batches = 0
        self._finished_epoch: tuple[str, float, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain is None:
            console = Console(**self._console_kwargs)
            self.plain = not (console.is_terminal or console.is_jupyter)
        if self.plain:
            self.disable()  # every hook of the rich bar returns at once; the lines come from the hooks below

    def _get_train_description(self, current_epoch: int) -> str:
        # As Lightning does: padded to the validation bar's label, so the two do not flicker.
        return f"{epoch_label(current_epoch, self.trainer.max_epochs):{len(self.validation_description)}}"

    def _start_pass(self) -> None:
        self._pass_started, self._pass_batches = time.monotonic(), 0

    def _print_line(self, trainer: L.Trainer, head: str, metrics: dict[str, Any], took: float, batches: int) -> None:
        if not self.plain or not trainer.is_global_zero:
            return
        shown = "".join(f"  {name} {float(value):.4f}" for name, value in metrics.items())
        rate = f" ({batches / took:.1f} it/s)" if took > 0 and batches else ""
        print(f"{head}{shown}  {batches} batches in {took:.1f}s{rate}", file=sys.stdout, flush=True)

    def _end_pass(self, trainer: L.Trainer, head: str) -> None:
        self._print_line(trainer, head, {}, time.monotonic() - self._pass_started, self._pass_batches)

    def _print_finished_epoch(self, trainer: L.Trainer) -> None:
        # Callbacks' on_train_epoch_end runs before the model's, which logs the epoch's train loss:
        # the line waits for the next epoch's start (or the end of training) to show it.
        if self._finished_epoch is None:
            return
        (head, took, batches), self._finished_epoch = self._finished_epoch, None
        values = trainer.callback_metrics
        metrics = {shown: values[name] for name, shown in LINE_METRICS.items() if name in values}
        self._print_line(trainer, head, metrics, took, batches)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._print_finished_epoch(trainer)
        self._start_pass()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._pass_batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        took = time.monotonic() - self._pass_started
        self._finished_epoch = (epoch_label(trainer.current_epoch, trainer.max_epochs), took, self._pass_batches)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._print_finished_epoch(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._start_pass()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_test_batch_end(trainer, pl_module, *args, **kwargs)
        self._pass_batches += 1

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._end_pass(trainer, "Test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._start_pass()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_predict_batch_end(trainer, pl_module, *args, **kwargs)
        self._pass_batches += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_end(trainer, pl_module)
        self._end_pass(trainer, "Predict")

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


def missing_progress_bar(callbacks: Sequence[Callback], trainer_config: Mapping[str, Any]) -> list[ProgressBar]:
    """[EpochProgressBar()] for a trainer whose callbacks hold no progress bar (callbacks=none), else [].

    Lightning would add its own TQDM bar there: epochs counted from 0 out of max_epochs - 1, and in
    a pipe or a log file its metrics wrapped over several lines. None where the trainer's config
    turns the bar off (enable_progress_bar: false).
    """
    if trainer_config.get("enable_progress_bar", True) is False or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return []
    return [EpochProgressBar()]


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
