"""The Lightning callbacks and plugin every run uses: atomic checkpoint IO, the checkpoint callbacks,
per-epoch reseeding and the recorder of test outputs that the evaluation report is computed from.

Configs target these by name (conf/callbacks/default.yaml), so they live apart from the CLIs.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import callbacks

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
    """Lightning's, with last.ckpt written after every epoch, a moved or copied run folder continued,
    and the best checkpoint's validation metrics kept (`best_metrics`).

    Lightning keeps the best checkpoint's monitored score only; metrics.json reports that
    checkpoint's val/f1 and val/loss beside it, not the last epoch's. `best_metrics` travels in the
    callback's state, so a resumed run still knows the figures of a best epoch it did not run.

    Since Lightning 2.6, save_last writes last.ckpt only in an epoch that also wrote a top-k
    checkpoint, so once val/acc stops improving last.ckpt falls behind and a resume redoes the
    epochs since. Here it is written at every save point, as before 2.6 (with 2.5 the extra call
    finds the step saved already and does nothing).

    A resumed run checkpoints into the folder of the checkpoint it resumes (see train()), whose
    state names files by their path when it was saved. Lightning restores the top-k and last-file
    state only if that path is unchanged; for a moved or copied folder it would keep the old best
    file forever next to the new one. With `rebase_resumed_paths` the recorded paths are moved
    into this dirpath first. (conf/callbacks/default.yaml also turns the -v1 version counter off:
    a file of the same name is this run's, to overwrite.)
    """

    rebase_resumed_paths = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best_metrics: dict[str, float] = {}
        self._noted: tuple[str, float | None] = ("", None)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning names a new best before it saves it: note its metrics first, so the file has them.
        self._note_best_metrics(trainer)
        super()._save_checkpoint(trainer, filepath)

    @property
    def _best(self) -> tuple[str, float | None]:
        return self.best_model_path, None if self.best_model_score is None else float(self.best_model_score)

    def _note_best_metrics(self, trainer: L.Trainer) -> None:
        best = self._best
        if best[0] and best != self._noted:
            self._noted = best
            self.best_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def _save_last_if_missed(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_metrics": self.best_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_metrics = dict(state_dict.get("best_metrics") or {})
        old = state_dict.get("dirpath")
        if self.rebase_resumed_paths and old and self.dirpath and Path(old) != Path(self.dirpath):

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
            trainer.save_checkpoint(self.ckpt_path)
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
        self._hook: Any = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logits, self.labels = [], []
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
