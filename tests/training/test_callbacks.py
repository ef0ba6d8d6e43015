"""The callbacks a training run adds: what they print, and the private Lightning API they rely on."""

from __future__ import annotations

import inspect
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from fmnist_tl.training.callbacks import ModelCheckpoint, ModelSummary, OnExceptionCheckpoint, silence_known_noise


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.head(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "accelerator": "cpu"}
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def test_private_lightning_api_we_call_is_still_there():
    """No public hook exists for these (fmnist_tl/training/callbacks.py, fmnist_tl/runtime/record.py);
    this fails when Lightning renames or reshapes them, before a run does."""
    expected = {
        "_should_save_on_train_epoch_end": ["self", "trainer"],
        "_should_skip_saving_checkpoint": ["self", "trainer"],
        "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
        "_monitor_candidates": ["self", "trainer"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(LightningModelCheckpoint, name)).parameters) == params, name
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def test_model_summary_shows_no_flops(tmp_path, capsys):
    _trainer(tmp_path, callbacks=[ModelSummary(max_depth=1)], enable_checkpointing=False).fit(Tiny())
    out = capsys.readouterr().out
    assert "head" in out and "Linear" in out and "Trainable params: 6" in out
    assert "FLOPs" not in out


def test_lightnings_uninformative_lines_are_dropped(tmp_path, caplog):
    silence_known_noise()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, enable_checkpointing=False, enable_model_summary=False).fit(Tiny())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for noise in ("GPU available: False", "TPU available", "💡 Tip"):
        assert noise not in logged
    assert "`Trainer.fit` stopped" in logged  # what a user may want stays


def test_the_exception_checkpoint_is_saved_without_lightnings_weights_only_note(tmp_path, caplog):
    class Interrupted(Tiny):
        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

    saver = OnExceptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        _trainer(tmp_path, callbacks=[saver]).fit(Interrupted())
    assert (tmp_path / "checkpoints" / "on_exception.ckpt").is_file()
    assert "weights_only" not in caplog.text


def test_a_resumed_run_continues_in_the_checkpoints_folder_it_resumes(tmp_path):
    """The checkpoint callback follows fit's ckpt_path into that run's checkpoints/ (no train() code)."""

    def checkpoint(dirpath) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=dirpath, filename="epoch_{epoch:03d}", auto_insert_metric_name=False, save_last=True
        )

    first = tmp_path / "a" / "checkpoints"
    _trainer(tmp_path, callbacks=[checkpoint(first)]).fit(Tiny())
    moved = tmp_path / "moved" / "checkpoints"
    (tmp_path / "a").rename(tmp_path / "moved")
    resumed = checkpoint(tmp_path / "b" / "checkpoints")
    _trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(Tiny(), ckpt_path=moved / "last.ckpt", weights_only=True)
    assert resumed.dirpath == str(moved.resolve())
    # The recorded paths moved with the folder: epoch_000 is replaced as the one checkpoint kept.
    assert sorted(p.name for p in moved.iterdir()) == ["epoch_001.ckpt", "last.ckpt"]
    assert not (tmp_path / "b").exists()


def test_lightnings_received_sigterm_line_is_dropped(caplog):
    """The interruption's one error line names SIGTERM; Lightning's own log line would be a second."""
    silence_known_noise()
    with caplog.at_level(logging.INFO):
        signal_log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
        signal_log.info("[rank: 0] Received SIGTERM: 15")
    assert "Received SIGTERM" not in caplog.text
