"""The Lightning callbacks and plugin every run uses: atomic checkpoint IO, the checkpoint callbacks,
per-epoch reseeding, the recorder of test outputs that the evaluation report is computed from, and
the fit's progress as the main process sees it (also under ddp_spawn).

Configs target these by name (conf/callbacks/default.yaml), so they live apart from the CLIs.
"""

from __future__ import annotations

import logging
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import callbacks
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from fmnist_tl.core import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file and renamed, read back with weights_only=True.

    A kill -9 mid-save leaves the previous checkpoint intact and at worst a stray temp file,
    which the next run over that directory removes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's, with last.ckpt written after every epoch, a resumed run continued in its own
    checkpoints/ folder (also when that folder moved), and the best checkpoint's validation metrics kept.

    `best_metrics`: Lightning keeps the best checkpoint's monitored score only; metrics.json reports
    that checkpoint's val/f1 and val/loss beside it. They travel in the callback's state, so a
    resumed run still knows the figures of a best epoch it did not run.

    A resumed run checkpoints into the folder of the checkpoint it resumes: Lightning restores the
    best score and top-k bookkeeping only for an unchanged dirpath, and the recorded paths are moved
    into that folder when it was moved or copied. (conf/callbacks/default.yaml turns the -v1 version
    counter off: a file of the same name is this run's, to overwrite.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best_metrics: dict[str, float] = {}
        self._noted: tuple[str, float | None] = ("", None)
        self._callback_metrics: Callable[[], dict[str, Any]] = dict
        self._continues_resumed_dir = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._callback_metrics = lambda: trainer.callback_metrics

    @property
    def _best(self) -> tuple[str, float | None]:
        return self.best_model_path, None if self.best_model_score is None else float(self.best_model_score)

    def state_dict(self) -> dict[str, Any]:
        # Called as a checkpoint is written, after Lightning named a new best: the file holds its metrics.
        best = self._best
        if best[0] and best != self._noted:
            self._noted = best
            self.best_metrics = {k: float(v) for k, v in self._callback_metrics().items() if k.startswith("val/")}
        return {**super().state_dict(), "best_metrics": self.best_metrics}

    def _save_last_if_missed(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
        # Private calls: Lightning >= 2.6 writes last.ckpt only with a top-k save and has no public hook
        # for "at every save point" (no upstream issue found; tests/training/test_train.py guards them).
        if (
            self.save_last
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
            and not self._should_skip_saving_checkpoint(trainer)  # also: saved at this step already
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=False)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resumed = Path(str(trainer.ckpt_path or ""))
        if trainer.state.fn == "fit" and resumed.parent.name == "checkpoints":
            # Real path: how Lightning records a dirpath, so an unmoved folder compares equal.
            self.dirpath, self._continues_resumed_dir = os.path.realpath(resumed.parent), True
            log.info("Checkpoints continue in %s", self.dirpath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_metrics = dict(state_dict.get("best_metrics") or {})
        old = state_dict.get("dirpath")
        if self._continues_resumed_dir and old and self.dirpath and Path(old) != Path(self.dirpath):

            def moved(path: Any) -> Any:
                if not path or Path(old) not in Path(path).parents:
                    return path
                return str(Path(self.dirpath) / Path(path).relative_to(old))

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)
        # best_metrics are the restored best checkpoint's already.
        self._noted = self._best

    def checkpoint_to_test(self) -> str:
        """The best checkpoint; the last one when a resumed run's best file is gone ("" for none)."""
        best = self.best_model_path
        if best and not Path(best).is_file():
            last = self.last_model_path if self.last_model_path and Path(self.last_model_path).is_file() else ""
            log.warning("best checkpoint %s no longer exists; testing %s", best, last or "the final weights")
            return last
        return best

    def best_validation(self) -> dict[str, float]:
        """The best checkpoint's validation metrics, its monitored score included ({} before one)."""
        if self.best_model_score is None:
            return {}
        return {**self.best_metrics, str(self.monitor): float(self.best_model_score)}


class OnExceptionCheckpoint(callbacks.Checkpoint):
    """Save `dirpath/filename.ckpt` on Ctrl-C, SIGTERM or a crash, like Lightning's callback of that name.

    Not a subclass of Lightning's: with one of those, `fit(ckpt_path=None)` takes ckpt_path="last"
    and silently resumes from any last or on-exception checkpoint already in the run dir (and warns
    about it on every fresh run); here ckpt_path=null starts fresh, and resuming is train()'s
    explicit ckpt_path. A failure to save (say, the disk is full) never hides the original error.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.dirpath, self.filename = dirpath, filename

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the full state, to resume from
        except Exception as e:
            log.warning("could not save the exception checkpoint: %s", e)


class ReseedEachEpoch(L.Callback):
    """Seed the RNGs from (seed, epoch, rank) at the start of every training epoch.

    Dropout masks then depend only on the epoch, so 1 epoch + resume gives the same weights as
    2 epochs straight (the sampler's order is fixed by (seed, epoch) too).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # At the first batch, not at epoch start: creating the loader iterator draws from the
        # global RNG, and Lightning does that at different points in a fresh and a resumed fit.
        if batch_idx != 0:
            return
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 1009 + trainer.global_rank) % (2**31)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class RecordTestOutputs(L.Callback):
    """Records the logits and labels of every test batch while `trainer.test` runs.

    A forward hook on the model's head sees the logits for images and cached features alike;
    test_step itself returns nothing, so this costs no extra forward pass.
    """

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        # The trainer that ran the test: the report reads its CSV log for the training curves.
        self.trainer: L.Trainer | None = None
        self._hook: Any = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logits, self.labels, self.trainer = [], [], trainer
        self._hook = pl_module.head.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.logits.append(output.detach().float().cpu())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.labels.append(batch[1].detach().cpu())

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C) float32, labels (N,) int64) in test-loader order."""
        if not self.labels or len(self.logits) != len(self.labels):
            raise RuntimeError(
                f"test outputs incomplete: {len(self.logits)} logit batches for {len(self.labels)} label batches"
            )
        return torch.cat(self.logits), torch.cat(self.labels)


class ModelSummary(callbacks.RichModelSummary):
    """Lightning's rich model summary without its FLOPs, which read 0 for a model with no example input."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        shown = [c for c in ("Name", "Type", "Params", "Mode") if c in columns]
        for name in shown:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(*(columns[c] for c in shown), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"Trainable params: {get_human_readable_count(int(trainable_parameters))}, "
            f"frozen: {get_human_readable_count(int(frozen))}, size {model_size:.1f} MB"
        )


# Lightning's lines that tell a user nothing they can act on; what matters is logged by us.
_NOISE = re.compile(
    r"💡 Tip.*(litlogger|litmodels)|\s*Detected KeyboardInterrupt|(TPU|HPU) available|GPU available: False"
    r"|Restoring states from the checkpoint|Loaded model weights from the checkpoint|Restored all states from"
    r"|(\[rank: \d+\] )?Received SIGTERM"  # the one-line interruption error says it
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.match(record.getMessage())


_DROP_NOISE = _DropNoise()


def silence_known_noise() -> None:
    """Silence the warnings and log lines of Lightning and torch that are expected in every run.

    Called when a command starts, and in every process a run spawns (SilenceKnownNoise).
    """
    for message in (
        # The frozen backbone is in eval mode on purpose (BatchNorm stats must not move).
        r".*module\(s\) in eval mode at the start of training.*",
        r".*isinstance\(treespec, LeafSpec\)",
        # Mixed precision keeps fp32 weights, so the summary's 32-bit size estimate it warns about is right.
        r"Precision \S+-mixed is not supported by the model summary",
        # DDP warns when find_unused_parameters=True finds none; in a fine-tune run that is the fine-tune
        # phase, after head-only epochs that did have unused parameters (the case the warning names).
        r".*find_unused_parameters=True was specified in DDP constructor.*",
        # Lightning asks for sync_dist=True on epoch-level logs; ours come from torchmetrics' compute(),
        # which has synced them across ranks already.
        r"It is recommended to use `self.log\('(train|val|test)/(acc|f1|loss_epoch)', \.\.\., sync_dist",
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.signal_connector",
    ):
        logging.getLogger(name).addFilter(_DROP_NOISE)


class SilenceKnownNoise(L.Callback):
    """silence_known_noise() in each process of a run, also the ones ddp_spawn starts."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        silence_known_noise()


# trainer.callback_metrics keys: ddp_spawn's processes send callback_metrics back to the main process,
# not the fit loop's progress, which stays at 0 there.
FIT_EPOCHS, FIT_STEPS = "fit/epochs", "fit/global_step"


class FitProgress(L.Callback):
    """The epochs and optimizer steps the fit ran, into trainer.callback_metrics (see `fit_progress`)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics[FIT_EPOCHS] = torch.tensor(trainer.current_epoch)
        trainer.callback_metrics[FIT_STEPS] = torch.tensor(trainer.global_step)


def fit_progress(trainer: L.Trainer) -> tuple[int, int]:
    """(epochs, global_step) of the trainer's last fit, in the process that started it, also after
    ddp_spawn. Read it right after fit: a test resets the trainer's metrics."""
    metrics = trainer.callback_metrics
    if FIT_EPOCHS in metrics:
        return int(metrics[FIT_EPOCHS]), int(metrics[FIT_STEPS])
    return trainer.current_epoch, trainer.global_step
