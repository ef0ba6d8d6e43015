"""End to end on tiny data: real Trainer, real checkpoints, real Hydra CLI."""

from __future__ import annotations

import csv
import ctypes
import json
import math
import os
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from fmnist_tl.core.machine import NVML_CHECK_ENV, skip_nvml_retries_without_a_driver
from fmnist_tl.train import train
from fmnist_tl.training.model import TransferClassifier
from fmnist_tl.training.precision import resolve_precision
from tests.helpers import DDP_SIM, make_cfg, run_cli, tiny_overrides, unreachable_network_env


class RecordBackboneMode(L.Callback):
    def __init__(self) -> None:
        self.modes: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes |= {m.training for m in pl_module.backbone.modules()}
        assert pl_module.head.training


@pytest.mark.slow
def test_fast_dev_run(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg("debug=fdr"))
    assert metrics["status"] == "completed"
    assert metrics["global_step"] == 1
    # conf/debug/fdr.yaml: no checkpoints (Lightning's save_last would still write last.ckpt).
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_fit_and_test_writes_metrics_and_checkpoints_and_keeps_backbone_frozen(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("trainer.max_epochs=2")
    seen: dict = {}
    orig_fit = L.Trainer.fit

    def spy_fit(self, model, *a, **k):
        recorder = RecordBackboneMode()
        self.callbacks.append(recorder)
        seen["before"] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        seen["head_before"] = {k: v.clone() for k, v in model.head.state_dict().items()}
        out = orig_fit(self, model, *a, **k)
        seen["after"] = model.backbone.state_dict()
        seen["head_after"] = model.head.state_dict()
        seen["modes"] = recorder.modes
        return out

    monkeypatch.setattr(L.Trainer, "fit", spy_fit)
    metrics = train(cfg)
    run = tmp_path / "run"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("val/acc", "val/f1", "test/acc", "test/f1"):
        assert 0.0 <= on_disk[key] <= 1.0 + 1e-6  # torchmetrics' float32 F1 can round to 1.0000001
    assert on_disk["epochs"] == 2 and on_disk["weights_id"] == "random-init"
    # The tiny classes are easy: a head on a random frozen backbone beats chance (10%) clearly.
    assert on_disk["test/acc"] > 0.3
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert on_disk["best_model_path"].endswith(".ckpt")
    # Frozen means frozen: weights and BatchNorm running stats bit-identical, BN never in train mode.
    assert seen["modes"] == {False}
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])
    assert not all(torch.equal(seen["head_before"][k], seen["head_after"][k]) for k in seen["head_before"])
    # Our checkpoints load with weights_only=True and rebuild the model without fetching weights.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["weights_id"] == "random-init"
    model = TransferClassifier.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert torch.equal(model.head[0].weight, ckpt["state_dict"]["head.0.weight"])


@pytest.mark.slow
def test_resume_from_last(tiny_cfg, tmp_path):
    first = train(tiny_cfg("trainer.max_epochs=1", output="runs/a"))
    assert first["epochs"] == 1
    # ckpt_path=last finds runs/a/checkpoints/last.ckpt under paths.log_dir/task_name.
    cfg = tiny_cfg(
        "trainer.max_epochs=2", "ckpt_path=last", f"paths.log_dir={tmp_path}", "task_name=runs", output="runs/b"
    )
    second = train(cfg)
    assert second["resumed_from"].endswith("a/checkpoints/last.ckpt")
    assert second["epochs"] == 2
    # One more epoch only: global_step doubled, not tripled.
    assert second["global_step"] == 2 * first["global_step"]


@pytest.mark.slow
def test_resume_after_the_run_folder_moved_still_tests(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_epochs=1", output="runs/a"))
    (tmp_path / "runs" / "a").rename(tmp_path / "runs" / "moved")  # the recorded best path is gone
    ckpt = tmp_path / "runs" / "moved" / "checkpoints" / "last.ckpt"
    metrics = train(tiny_cfg("trainer.max_epochs=1", f"ckpt_path={ckpt}", output="runs/b"))
    assert metrics["status"] == "completed" and metrics["test/acc"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["model/scheduler=onecycle", "model.scheduler=null"])
def test_other_schedules_train(tiny_cfg, schedule):
    metrics = train(tiny_cfg(schedule, "test=false"))
    assert metrics["status"] == "completed" and metrics["val/acc"] > 0.2


def test_without_an_nvidia_driver_the_cuda_check_stops_retrying_nvml(monkeypatch):
    # Lightning's fork-safe check (NVML) retries loading libnvidia-ml at every torch.cuda.is_available(),
    # which AdamW calls at every step; without a driver the model switches to torch's plain check
    # when it makes its optimizer (in train(), a bench or anyone's own Trainer).
    monkeypatch.setenv(NVML_CHECK_ENV, "1")
    loaded = []

    def no_driver(name, *args, **kwargs):
        loaded.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    model = TransferClassifier(backbone="resnet18", weights=None, image_size=32)
    model.trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False)
    model.configure_optimizers()  # (building the model and Trainer asks torch's own NVML probe too)
    assert os.environ[NVML_CHECK_ENV] == "0" and "libnvidia-ml.so.1" in loaded
    monkeypatch.setenv(NVML_CHECK_ENV, "1")
    loaded.clear()
    assert skip_nvml_retries_without_a_driver() and os.environ[NVML_CHECK_ENV] == "0"
    assert loaded == ["libnvidia-ml.so.1"]
    assert not skip_nvml_retries_without_a_driver() and loaded == ["libnvidia-ml.so.1"]  # decided once
    # With a driver, Lightning's check stays: CUDA must not initialise before DDP forks its workers.
    monkeypatch.setenv(NVML_CHECK_ENV, "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: object())
    assert not skip_nvml_retries_without_a_driver() and os.environ[NVML_CHECK_ENV] == "1"


@pytest.mark.slow
def test_precision_auto_with_cached_features_is_fp32_and_explicit_is_obeyed(tiny_cfg):
    # The backbone only runs in extraction (which has its own probe); the head trains in fp32.
    assert train(tiny_cfg("trainer.precision=auto", "test=false"))["precision"] == "32-true"
    assert resolve_precision(tiny_cfg("trainer.precision=16-mixed").trainer) == "16-mixed"
    # Measured precision on a CPU: tests/test_probe.py::test_trainer_precision_auto_on_cpu_follows_the_measurement


@pytest.mark.slow
def test_cli_run_prints_metrics(tiny_mirror, tmp_path):
    proc = run_cli(*tiny_overrides(tiny_mirror, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = list((tmp_path / "logs" / "train" / "runs").glob("*/metrics.json"))
    assert len(runs) == 1
    assert json.loads(runs[0].read_text())["test/acc"] == printed["test/acc"]


@pytest.mark.slow
def test_multirun_two_jobs(tiny_mirror, tmp_path):
    proc = run_cli("-m", *tiny_overrides(tiny_mirror, tmp_path), "model.head.dropout=0.2,0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(jobs) == 2
    dropouts = set()
    for job in jobs:
        assert json.loads(job.read_text())["status"] == "completed"
        dropouts.add((job.parent / "config.yaml").read_text().count("dropout: 0.2"))
    assert dropouts == {0, 1}


@pytest.mark.slow
def test_ddp_sim_two_processes(tiny_mirror, tmp_path):
    with_bar = [o for o in tiny_overrides(tiny_mirror, tmp_path) if not o.startswith("callbacks.rich_progress_bar")]
    proc = run_cli(*with_bar, *DDP_SIM, env={"COLUMNS": "100", "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not a terminal: one plain line for the epoch and one for the test pass, from rank 0 only.
    assert len(re.findall(r"^Epoch 1/1  .* batches in ", proc.stdout, flags=re.M)) == 1, proc.stdout[-2000:]
    assert len(re.findall(r"^Test  \d+ batches in ", proc.stdout, flags=re.M)) == 1, proc.stdout[-2000:]
    # The test phase's new processes keep the fit's curves, and no false warnings come with them.
    (curves,) = (tmp_path / "logs" / "train" / "runs").glob("*/csv/metrics.csv")
    assert "val/acc" in curves.read_text().splitlines()[0]
    assert "exists and is not empty" not in proc.stderr and "sync_dist=True" not in proc.stderr
    (metrics_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "completed" and metrics["test/acc"] is not None
    # The fit ran in ddp_spawn's processes: its epochs and steps still reach the main process's record.
    assert metrics["epochs"] == 1 and metrics["global_step"] > 0
    # data.cache_features=auto is on here: rank 0 extracted each split once, the other rank loaded it.
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "features").glob("*.json")]
    assert sorted(m["fingerprint"]["split"] for m in manifests) == ["test", "train", "val"]
    assert {m["extracted_by"]["global_rank"] for m in manifests} == {0}


@pytest.mark.slow
def test_cli_without_weights_offline_stops_at_once(tmp_path):
    # The hub is unreachable whatever this machine's network: an empty hub cache, proxies that refuse.
    proc = run_cli(f"paths.root_dir={tmp_path}", env=unreachable_network_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    (last,) = proc.stderr.strip().splitlines()  # only the error: no torch.hub "Downloading: ..." before it
    assert not proc.stdout.strip()  # no "Seed set to 42"
    assert last.startswith("error: cannot get resnet50 IMAGENET1K_V1 weights")
    assert "hub/checkpoints/resnet50-0676ba61.pth" in last and "model.weights=null" in last
    assert "Connection refused" in last  # the refusing proxy, not whatever network this machine has
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "torch-home" / "hub" / "checkpoints").exists()  # no empty folder in the hub cache


def test_a_fresh_run_in_a_used_run_dir_moves_the_earlier_run_aside(tiny_cfg, tmp_path):
    """hydra.run.dir=X twice: the second run starts clean, the first is kept in X/previous-<time>/."""
    first = train(tiny_cfg("trainer.max_epochs=2", "test=false"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        second = train(tiny_cfg("trainer.max_epochs=1", "test=false"))
    run = tmp_path / "run"
    (aside,) = run.glob("previous-*")
    earlier = sorted(p.name for p in (aside / "checkpoints").iterdir())
    assert earlier == [Path(first["best_model_path"]).name, "last.ckpt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert second["best_model_path"] == str(run / "checkpoints" / "epoch_000.ckpt")
    assert json.loads((aside / "metrics.json").read_text())["epochs"] == 2
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "exists and is not empty" in m or "Previous log files" in m], messages


def test_a_run_resuming_from_its_own_run_dir_keeps_it(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_epochs=1", "test=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train(tiny_cfg("trainer.max_epochs=2", "test=false", f"ckpt_path={last}"))
    assert resumed["epochs"] == 2 and not list((tmp_path / "run").glob("previous-*"))


@pytest.mark.slow
def test_epoch_metrics_are_logged_once_per_epoch(trained_run):
    with open(trained_run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/loss_epoch", "val/acc"):
        logged = [r for r in rows if r.get(key)]
        assert [int(r["epoch"]) for r in logged] == [0, 1], key
    for r in rows:
        if r.get("train/loss_epoch"):
            assert math.isfinite(float(r["train/loss_epoch"]))
            assert 0.0 <= float(r["train/acc"]) <= 1.0 and 0.0 <= float(r["train/f1"]) <= 1.0
    assert any(r.get("train/loss_step") for r in rows)  # step 0 at least: logged every log_every_n_steps


@pytest.mark.slow
def test_metrics_json_reports_the_best_checkpoints_validation_figures(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    best = torch.load(metrics["best_model_path"], map_location="cpu", weights_only=True)
    with open(trained_run / "csv" / "metrics.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("val/acc") and int(r["epoch"]) == best["epoch"]]
    for key in ("val/acc", "val/f1", "val/loss"):
        assert metrics[key] == pytest.approx(float(row[key]), abs=1e-6), key


class ScriptedValidation(L.LightningModule):
    """Validation figures set per epoch: epoch 1 is the best, the epochs after it are worse."""

    ACC, F1 = [0.5, 0.7, 0.6, 0.55], [0.4, 0.65, 0.3, 0.2]

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.ACC[self.current_epoch])
        self.log("val/f1", self.F1[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)

    val_dataloader = train_dataloader


@pytest.mark.slow
def test_the_checkpoint_callback_keeps_the_best_epochs_metrics_across_a_resume(tmp_path):
    from fmnist_tl.training.callbacks import ModelCheckpoint

    def fit(max_epochs: int, ckpt_path: str | None = None) -> ModelCheckpoint:
        cb = ModelCheckpoint(
            dirpath=tmp_path,
            filename="epoch_{epoch:03d}",
            monitor="val/acc",
            mode="max",
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        trainer = L.Trainer(
            max_epochs=max_epochs,
            callbacks=[cb],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            num_sanity_val_steps=0,
        )
        trainer.fit(ScriptedValidation(), ckpt_path=ckpt_path, weights_only=True)
        return cb

    cb = fit(3)  # the last epoch (0.6) is not the best (0.7)
    assert cb.best_metrics == pytest.approx({"val/acc": 0.7, "val/f1": 0.65})
    saved = torch.load(cb.best_model_path, map_location="cpu", weights_only=True)
    assert saved["callbacks"][cb.state_key]["best_metrics"] == pytest.approx({"val/acc": 0.7, "val/f1": 0.65})
    # Resumed for one more, worse epoch: the best is still epoch 1, which this process never ran.
    resumed = fit(4, str(tmp_path / "last.ckpt"))
    assert resumed.best_model_path == cb.best_model_path
    assert resumed.best_metrics == pytest.approx({"val/acc": 0.7, "val/f1": 0.65})


@pytest.mark.parametrize("callbacks", ["default", "none"])
def test_output_that_is_not_a_terminal_gets_one_plain_line_per_epoch(callbacks, tiny_mirror, tmp_path, capsys):
    """In a pipe or a log file: `Epoch 1/2 ...` then `Epoch 2/2 ...`, each on one line of under 80 columns,
    with our EpochProgressBar and with callbacks=none (where Lightning's TQDM bar said `Epoch 1/1`)."""
    fast = ("trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "test=false")
    # The tiny runs turn the bar off (callbacks.rich_progress_bar=null): here it stays as configured.
    overrides = [o for o in tiny_overrides(tiny_mirror, tmp_path) if not o.startswith("callbacks.")]
    summary = ["callbacks.model_summary=null"] if callbacks == "default" else []
    train(make_cfg([*overrides, *fast, f"callbacks={callbacks}", *summary], tmp_path / "run"))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Epoch")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], out
    assert all(re.fullmatch(r"Epoch \d/2  loss \d\.\d{4}  val/acc \d\.\d{4}  3 batches in .*", line) for line in lines)
    assert all(len(line) < 80 for line in lines), lines
    # No bar redraws, no metric on a line of its own (Lightning's bars wrapped them at 80 columns).
    assert not [line for line in out.splitlines() if "val/acc" in line and not line.startswith("Epoch")], out


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_resume_from_a_checkpoint_saved_mid_validation_validates_again_without_warnings(
    stop, tiny_cfg, tmp_path, monkeypatch
):
    """SIGTERM between two validation batches: on_exception.ckpt. Resumed, the epoch validates again in
    full (Lightning took it as finished: no val/acc for ModelCheckpoint and EarlyStopping, which
    stopped the run), and no metric is computed over the training batches the resumed run never saw
    (torchmetrics' 'compute called before update', three times). Ctrl-C in a validation step: the same."""
    import warnings

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    epochs = ("trainer.max_epochs=2", "data.eval_batch_size=50")  # two validation batches
    train(tiny_cfg(*epochs, "test=false", output="straight"))
    real_step = TransferClassifier.validation_step

    def stop_in_validation(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 0 and not self.trainer.sanity_checking:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            self.trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(TransferClassifier, "validation_step", stop_in_validation)
    # train() lets the interruption through; the task wrapper turns it into the one-line message.
    with pytest.raises((SIGTERMException, KeyboardInterrupt, SystemExit)):  # Lightning: Ctrl-C as SystemExit
        train(tiny_cfg(*epochs, "test=false", output="a"))
    monkeypatch.setattr(TransferClassifier, "validation_step", real_step)
    saved = tmp_path / "a" / "checkpoints" / "on_exception.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(tiny_cfg(*epochs, "test=false", f"ckpt_path={saved}", output="b"))
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "before the ``update``" in m or "could not find the monitored key" in m], said
    assert resumed["epochs"] == 2

    def val_of_epoch_2(run):
        rows = list(csv.DictReader(open(tmp_path / run / "csv" / "metrics.csv")))
        assert not [r for r in rows if r.get("train/loss_epoch") and not math.isfinite(float(r["train/loss_epoch"]))]
        return [(float(r["val/acc"]), float(r["val/loss"])) for r in rows if r["epoch"] == "1" and r.get("val/loss")]

    # The whole validation of epoch 2 ran again: the same figures as the run that was never stopped.
    ((acc, loss),) = val_of_epoch_2("b")
    assert val_of_epoch_2("straight") == [(pytest.approx(acc), pytest.approx(loss, rel=1e-5))]
