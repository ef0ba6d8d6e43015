"""What a new user meets: no false warnings, options that do what they say, messages that fit."""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fmnist_tl import summarize
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.predict import main as predict_main
from fmnist_tl.train import train
from fmnist_tl.training.checkpoints import resolve_ckpt_path
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import make_cfg, run_cli, tiny_data_overrides, tiny_overrides

# Warnings a default run used to print that were false or not the user's to act on.
NOISE = (
    "ckpt_path=None",  # fit() without ckpt_path, while an OnExceptionCheckpoint is configured
    "no last checkpoint available",
    "litlogger",
    "is not supported by the model summary",  # bf16-mixed keeps fp32 weights: the estimate is right
    "exists and is not empty",  # a resumed run checkpoints into the resumed run's directory by design
    "Trainer already configured with model summary",
)


def cli_overrides(mirror, tmp) -> list[str]:
    """tiny_overrides, but with the default callbacks (progress bar, model summary) left on."""
    return [
        *tiny_data_overrides(mirror, tmp),
        "model.image_size=32",
        "data.batch_size=32",
        "model.backbone=resnet18",
        "model.weights=null",
        "trainer.accelerator=cpu",
    ]


@pytest.mark.slow
def test_fresh_and_resumed_default_runs_print_no_false_warnings(tiny_mirror, tmp_path):
    args = [*cli_overrides(tiny_mirror, tmp_path), "trainer.precision=bf16-mixed"]
    env = {"PYTHONWARNINGS": "default", "COLUMNS": "120"}
    fresh = run_cli(*args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}", env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = run_cli(*args, "trainer.max_epochs=2", f"ckpt_path={last}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for proc in (fresh, resumed):
        for noise in NOISE:
            assert noise not in proc.stderr, noise
        assert "site-packages/lightning" not in proc.stderr  # no Lightning warning at all
        assert "Trainable params" in proc.stdout  # callbacks.model_summary still prints the summary


@pytest.mark.slow
def test_a_fresh_run_into_a_used_run_dir_starts_fresh(tiny_cfg, tmp_path):
    """ckpt_path=null means a fresh start, even where the run dir already holds last.ckpt."""
    train(tiny_cfg("test=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)["state_dict"]["head.0.weight"]
    train(tiny_cfg("test=false", "seed=7"))
    second = torch.load(last, weights_only=True)["state_dict"]["head.0.weight"]
    # Lightning's own OnExceptionCheckpoint would have resumed the finished run and trained nothing.
    assert not torch.equal(first, second)


@pytest.mark.slow
def test_callbacks_none_writes_no_checkpoint_and_reports_the_final_weights(tiny_mirror, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_mirror, tmp_path) if not o.startswith("callbacks.")]
    metrics = train(make_cfg([*overrides, "callbacks=none"], tmp_path / "run"))
    assert not list(tmp_path.rglob("*.ckpt"))
    assert metrics["best_model_path"] == "" and metrics["test/acc"] is not None
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "final weights" in report["checkpoint"]
    assert report["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_refused_config_leaves_no_run_dir(tmp_path):
    proc = run_cli(f"paths.root_dir={tmp_path}", "trainer.max_epochs=0", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: trainer.max_epochs=0 must be an integer >= 1"
    assert not list((tmp_path / "logs" / "train" / "runs").iterdir())


@pytest.mark.slow
def test_experiment_replacing_a_chosen_group_says_so_once(tmp_path):
    # ckpt_path=last with no earlier run: a quick refusal after the config is composed and checked.
    args = (f"paths.root_dir={tmp_path}", "experiment=notebook", "ckpt_path=last")
    proc = run_cli("model=resnet18", *args, timeout=120)
    assert proc.returncode == 2 and "ckpt_path=last" in proc.stderr
    said = [line for line in proc.stdout.splitlines() if "experiment=notebook" in line]
    assert len(said) == 1
    assert "replaces values your model=resnet18 set: model.backbone resnet18 -> resnet50" in said[0]
    quiet = run_cli("model=resnet50", *args, timeout=120)
    assert quiet.returncode == 2 and "experiment=notebook" not in quiet.stdout


# ---- 4. messages that fit the mistake ------------------------------------------------------------


@pytest.mark.parametrize("content", [b"# fmnist_tl\nnot a checkpoint\n", b"", "zip"], ids=["text", "empty", "zip"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(content, tmp_path, tiny_cfg, capsys):
    path = tmp_path / "README.md"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(FmnistError, match=r"is not an fmnist_tl checkpoint \(") as err:
        TransferClassifier.from_checkpoint(path)
    assert "refused" not in str(err.value)
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(path), str(tmp_path)])
    assert capsys.readouterr().err.strip().endswith("pass a .ckpt file from a training run")
    with pytest.raises(FmnistError, match=rf"ckpt_path={path} is not an fmnist_tl checkpoint"):
        train(tiny_cfg(f"ckpt_path={path}"))


def _sweep(log_dir: Path, name: str) -> Path:
    sweep = log_dir / "train" / "multiruns" / name
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (sweep / "0" / "metrics.json").write_text(json.dumps({"status": "completed", "val/acc": 0.5}))
    return sweep


def test_summarize_without_argument_takes_the_sweep_started_last_in_the_configured_log_dir(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FMNIST_ROOT", str(tmp_path))
    old = _sweep(tmp_path / "logs", "2026-11-28_09-00-00_000001")
    new = _sweep(tmp_path / "logs", "2026-11-28_10-00-00_000001")
    summarize.main([str(old)])  # re-summarising the old sweep makes it the most recently modified
    os.utime(old, (time.time() + 60, time.time() + 60))
    assert summarize.newest_sweep_dir() == new
    capsys.readouterr()
    summarize.main([])
    assert (new / "sweep_summary.md").is_file()
    # --log-dir looks elsewhere.
    elsewhere = _sweep(tmp_path / "other", "2026-01-01_00-00-00_000000")
    summarize.main(["--log-dir", str(tmp_path / "other")])
    assert (elsewhere / "sweep_summary.md").is_file()


def _study(log_dir: Path, name: str, started: float) -> Path:
    """An Optuna study's dir as conf/hparams_search/head_optuna.yaml places it: <task>/studies/<study_name>."""
    study = log_dir / "train" / "studies" / name
    (study / "0" / ".hydra").mkdir(parents=True)
    (study / "0" / ".hydra" / "overrides.yaml").write_text("- model.optimizer.lr=0.001\n")
    (study / "0" / "metrics.json").write_text(json.dumps({"status": "completed", "val/acc": 0.7}))
    os.utime(study / "0" / ".hydra" / "overrides.yaml", (started, started))
    return study


def test_summarize_without_argument_takes_the_newest_sweep_of_either_kind_multirun_or_study(
    tmp_path, monkeypatch, capsys
):
    """Studies live in <log_dir>/<task>/studies/<name>/, not */multiruns/: found too, newest of both wins."""
    monkeypatch.setenv("FMNIST_ROOT", str(tmp_path))
    log_dir = tmp_path / "logs"
    _sweep(log_dir, "2026-11-28_10-00-00_000001")
    started = time.mktime(time.strptime("2026-11-28_10-00-00", "%Y-%m-%d_%H-%M-%S"))
    study = _study(log_dir, "head_optuna", started + 3600)  # a trial started an hour after the multirun
    assert summarize.newest_sweep_dir() == study
    summarize.main([])
    assert "model.optimizer.lr" in capsys.readouterr().out and (study / "sweep_summary.md").is_file()
    # Summarising the study wrote into it; a multirun started later is still the newer sweep.
    newer = _sweep(log_dir, "2026-11-28_12-00-00_000001")
    assert summarize.newest_sweep_dir() == newer
    # Rerunning the study (a new trial starting now) makes it the newest again.
    (study / "1" / ".hydra").mkdir(parents=True)
    (study / "1" / ".hydra" / "overrides.yaml").write_text("- model.optimizer.lr=0.01\n")
    assert summarize.newest_sweep_dir() == study


def test_summarize_without_any_sweep_names_both_places_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMNIST_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no sweep dirs under ") and "/*/multiruns/" in err and "/*/studies/" in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_ckpt_path_last_takes_the_furthest_trained_checkpoint_not_the_newest_file(tiny_cfg, tmp_path):
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    log_dir = tmp_path / "logs"
    train(tiny_cfg(*fast, "trainer.max_epochs=2", output="logs/train/runs/a"))
    train(tiny_cfg(*fast, output="logs/train/runs/b"))
    a, b = (log_dir / "train" / "runs" / n / "checkpoints" for n in ("a", "b"))
    # b is newer but trained less; a stale last.ckpt with a newer time sits next to a's last-v1.ckpt.
    shutil.copy(a / "last.ckpt", a / "last-v1.ckpt")
    shutil.copy(b / "last.ckpt", a / "last.ckpt")
    for path in (a / "last.ckpt", b / "last.ckpt"):
        os.utime(path, (time.time() + 60, time.time() + 60))
    cfg = tiny_cfg("ckpt_path=last", f"paths.log_dir={log_dir}", output="logs/train/runs/c")
    assert resolve_ckpt_path(cfg) == str(a / "last-v1.ckpt")


@pytest.mark.slow
def test_resuming_a_copied_run_folder_keeps_one_last_and_one_best(tiny_cfg, tmp_path, recwarn, monkeypatch):
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    train(tiny_cfg(*fast, output="a"))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    before = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    copied = tmp_path / "copy" / "checkpoints"
    monkeypatch.chdir(tmp_path)  # a relative ckpt_path, as typed in a shell
    metrics = train(tiny_cfg(*fast, "trainer.max_epochs=3", "ckpt_path=copy/checkpoints/last.ckpt", output="b"))
    names = sorted(p.name for p in copied.iterdir())
    assert "last.ckpt" in names and not [n for n in names if "-v" in n]
    assert len(names) == 2 and Path(metrics["best_model_path"]).parent == copied  # one best, in the copy
    assert torch.load(copied / "last.ckpt", weights_only=True)["global_step"] == 3 * 2
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == before  # the original untouched
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


@pytest.mark.slow
def test_last_ckpt_holds_the_last_epoch_also_when_val_stops_improving(tiny_cfg, tmp_path):
    """Lightning 2.6 writes last.ckpt only with a new best: a resume would redo the epochs since."""
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    # An LR too small to change a prediction: val/acc never improves after epoch 0.
    train(tiny_cfg(*fast, "trainer.max_epochs=3", "model.optimizer.lr=1e-12", "callbacks.early_stopping=null"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 3 * 2)


# ---- 5. the progress bar -------------------------------------------------------------------------


def _bar_lines(stdout: str, label: str) -> list[str]:
    return [line.rstrip() for line in stdout.splitlines() if line.startswith(label)]


@pytest.mark.slow
def test_progress_bar_counts_epochs_from_one_on_one_line_with_few_metrics(tiny_mirror, tmp_path):
    # The rich bar as a terminal shows it (a pipe gets plain lines: test_train's plain-line test).
    bar = "+callbacks.rich_progress_bar.plain=false"
    args = (*cli_overrides(tiny_mirror, tmp_path), "trainer.precision=32-true", "debug=fdr", bar)
    proc = run_cli(*args, env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (epoch,) = _bar_lines(proc.stdout, "Epoch")
    assert epoch.startswith("Epoch 1/1 ") and len(epoch) <= 100
    # The bar's metrics end the line: nothing wrapped onto the next one.
    assert epoch.split("it/s ", 1)[1].startswith("loss: ") and " val/acc: " in epoch
    assert not [name for name in ("val/f1", "val/loss", "train/acc", "v_num") if name in epoch]
    (testing,) = _bar_lines(proc.stdout, "Testing")
    assert "0.00it/s" not in proc.stdout and len(testing) <= 100
