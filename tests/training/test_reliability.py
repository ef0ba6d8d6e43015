"""A bad file, a kill or a typo costs the user a clear message and nothing else."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import fmnist_tl.training.callbacks as callbacks_mod
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.core.files import atomic_write_json, remove_stale_temp_files
from fmnist_tl.data.fashion_mnist import FashionMNISTDataModule
from fmnist_tl.train import train
from fmnist_tl.training.callbacks import AtomicCheckpointIO
from fmnist_tl.training.checkpoints import resolve_ckpt_path
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import (
    REPO,
    TINY_SIZES,
    RunsCode,
    idx_bytes,
    run_cli,
    start_cli,
    tiny_overrides,
    tiny_split,
    write_tiny_mirror,
)

# ---------------------------------------------------------------- 1. data files


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _bad_crc(data: bytes) -> bytes:
    blob = bytearray(gzip.compress(data))
    blob[-8] ^= 0xFF  # the CRC32 trailer
    return bytes(blob)


IMAGES, LABELS = tiny_split(TINY_SIZES["train"], 0)
DATA_CASES = {
    # case id: (file to corrupt, its new bytes, expected message part)
    "truncated_gz": ("train-images-idx3-ubyte.gz", _gz(idx_bytes("images", IMAGES))[:5000], "not a valid gzip file"),
    "bad_crc": ("train-images-idx3-ubyte.gz", _bad_crc(idx_bytes("images", IMAGES)), "not a valid gzip file"),
    "not_gzip": ("train-labels-idx1-ubyte.gz", b"hello, not gzip at all", "not a valid gzip file"),
    "wrong_magic": ("train-labels-idx1-ubyte.gz", _gz(b"\x00\x00\x08\x03" + idx_bytes("labels", LABELS)[4:]), "magic"),
    "count_vs_payload": ("train-images-idx3-ubyte.gz", _gz(idx_bytes("images", IMAGES)[:-784]), "payload is"),
    "labels_vs_images": ("train-labels-idx1-ubyte.gz", _gz(idx_bytes("labels", LABELS[:-1])), "399 labels for 400"),
    "label_10": ("t10k-labels-idx1-ubyte.gz", _gz(idx_bytes("labels", torch.full((100,), 10))), "label 10 is out"),
    "not_28x28": ("t10k-images-idx3-ubyte.gz", _gz(idx_bytes("images", torch.zeros(100, 32, 32))), "expected 28x28"),
}


def corrupt_mirror(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    mirror = write_tiny_mirror(tmp_path / f"mirror_{case}")
    name, blob, message = DATA_CASES[case]
    (mirror / name).write_bytes(blob)
    return mirror, name, message


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file_named_and_nothing_written(case, tmp_path):
    mirror, name, message = corrupt_mirror(tmp_path, case)
    # No count check, so the images-vs-labels comparison is what catches a missing label.
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), mirror_dir=str(mirror), expected_sizes={})
    with pytest.raises(FmnistError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert name in msg and message in msg and "\n" not in msg
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    # Not even the valid files: all four are checked first (only the lock file is there).
    assert [p.name for p in raw.iterdir()] in ([], [".prepare.lock"])


@pytest.mark.slow
@pytest.mark.parametrize("case, optimize", [("bad_crc", False), ("label_10", True), ("count_vs_payload", True)])
def test_bad_data_file_cli_one_line_exit_nonzero(case, optimize, tmp_path):
    """Checks are real raises, not asserts: they hold under `python -O` too."""
    mirror, name, message = corrupt_mirror(tmp_path, case)
    args = [*tiny_overrides(mirror, tmp_path), "data.expected_sizes.train=null", "data.expected_sizes.test=null"]
    cmd = [sys.executable, *(["-O"] if optimize else []), "-m", "fmnist_tl.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last and message in last
    assert not list((tmp_path / "data").rglob("*ubyte"))
    # With HYDRA_FULL_ERROR=1 the user gets the full trace instead.
    if not optimize:
        full = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"}
        )
        assert full.returncode != 0 and "Traceback" in full.stderr


# ---------------------------------------------------------------- 3. weights and checkpoints


def test_malicious_checkpoint_refused_for_resume_and_predict(tiny_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(str(marker))}, evil)
    with pytest.raises(FmnistError, match="refused"):
        train(tiny_cfg(f"ckpt_path={evil}"))
    with pytest.raises(FmnistError, match="refused"):
        TransferClassifier.from_checkpoint(evil)
    assert not marker.exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.slow
def test_truncated_checkpoint_is_clear(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg())
    last = Path(metrics["best_model_path"]).parent / "last.ckpt"
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[:3000])
    with pytest.raises(FmnistError, match="corrupt or truncated"):
        train(tiny_cfg(f"ckpt_path={broken}", output="run2"))
    with pytest.raises(FmnistError, match="corrupt or truncated"):
        TransferClassifier.from_checkpoint(broken)


# ---------------------------------------------------------------- 4. interruptions


def _start_long_run(tmp_path: Path, mirror: Path) -> subprocess.Popen:
    return start_cli(*tiny_overrides(mirror, tmp_path), "trainer.max_epochs=500", "callbacks.early_stopping=null")


def _wait_for(path_glob, root: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.2)
    raise TimeoutError(path_glob)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_with_loadable_checkpoint(sig, tiny_mirror, tmp_path):
    proc = _start_long_run(tmp_path, tiny_mirror)
    try:
        _wait_for("logs/train/runs/*/checkpoints/last.ckpt", tmp_path)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130)
    (saved,) = tmp_path.glob("logs/train/runs/*/checkpoints/on_exception.ckpt")
    # One line: what stopped it, where the checkpoint is, how to go on; none of Lightning's lines.
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert stderr.strip().splitlines() == [
        f"error: training interrupted by {name}; checkpoint saved at {saved}, resume with ckpt_path={saved}"
    ]
    assert "Detected KeyboardInterrupt" not in stdout and "weights_only" not in stdout
    model = TransferClassifier.from_checkpoint(saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not list(tmp_path.rglob("*.tmp"))


_SAVE_LOOP = """
import sys, torch
from fmnist_tl.core.files import atomic_write_bytes
if sys.argv[2] == "checkpoint":
    from fmnist_tl.training.callbacks import AtomicCheckpointIO
    io = AtomicCheckpointIO()
state = {"w": torch.randn(4_000_000)}
i = 0
while True:
    state["step"] = i
    if sys.argv[2] == "checkpoint":
        io.save_checkpoint(state, sys.argv[1])
    else:  # the feature cache's writer (safetensors blob + manifest go through atomic_write_bytes)
        atomic_write_bytes(sys.argv[1], state["w"].numpy().tobytes())
    if i == 0:
        print("saved", flush=True)
    i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["checkpoint", "cache"])
def test_kill_9_during_checkpoint_and_cache_writes_never_leaves_a_bad_file(writer, tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    for delay in (0.07, 0.23):  # kill at different points of the save loop
        cmd = [sys.executable, "-c", _SAVE_LOOP, str(target), writer]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"saved\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():  # the file is always either the previous or the new complete one
            if writer == "checkpoint":
                assert AtomicCheckpointIO().load_checkpoint(target)["w"].shape == (4_000_000,)
            else:
                assert target.stat().st_size == 4_000_000 * 4
    assert target.exists()
    # The next run over this directory removes temp files a killed writer left behind.
    remove_stale_temp_files(target.parent)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------- 5. resume parity


PARITY = ("trainer.deterministic=true", "callbacks.early_stopping=null", "model.head.dropout=0.3")


def _assert_same_run(straight: dict, resumed: dict, a_ckpt: Path, b_ckpt: Path) -> None:
    for key in ("val/acc", "val/f1", "test/acc", "test/f1", "test/loss"):
        assert abs(straight[key] - resumed[key]) <= 1e-6, key
    a = torch.load(a_ckpt, weights_only=True)["state_dict"]
    b = torch.load(b_ckpt, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.mark.slow
def test_resume_parity_two_epochs_vs_one_plus_resume(tiny_cfg, tmp_path):
    # The default cosine: extending a finished 1-epoch run to 2 re-plans its cosine from the LR of
    # epoch 0, which is the 2-epoch run's schedule (a restored T_max=1 would put epoch 1 at LR 0).
    straight = train(tiny_cfg(*PARITY, "trainer.max_epochs=2", output="straight"))
    train(tiny_cfg(*PARITY, "trainer.max_epochs=1", output="part1"))
    part1_last = tmp_path / "part1" / "checkpoints" / "last.ckpt"
    resumed = train(tiny_cfg(*PARITY, "trainer.max_epochs=2", f"ckpt_path={part1_last}", output="part2"))
    # The resumed run keeps checkpointing into part1's checkpoints/ (best/top-k state carries over).
    assert resumed["best_model_path"].startswith(str(tmp_path / "part1" / "checkpoints"))
    _assert_same_run(straight, resumed, tmp_path / "straight" / "checkpoints" / "last.ckpt", part1_last)


class _StopAfterFirstEpoch(L.Callback):
    """An interruption at an epoch boundary: the run planned for max_epochs stops after epoch 0."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["model/scheduler=cosine", "model/scheduler=onecycle"])
def test_interrupted_run_resumed_equals_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch, schedule):
    straight = train(tiny_cfg(*PARITY, schedule, "trainer.max_epochs=3", output="straight"))
    orig_fit = L.Trainer.fit

    def interrupted_fit(self, *args, **kwargs):
        self.callbacks.append(_StopAfterFirstEpoch())
        return orig_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", interrupted_fit)
    assert train(tiny_cfg(*PARITY, schedule, "trainer.max_epochs=3", output="part1"))["epochs"] == 1
    monkeypatch.undo()
    part1_last = tmp_path / "part1" / "checkpoints" / "last.ckpt"
    assert torch.load(part1_last, weights_only=True)["lr_plan"]["max_epochs"] == 3
    resumed = train(tiny_cfg(*PARITY, schedule, "trainer.max_epochs=3", f"ckpt_path={part1_last}", output="part2"))
    assert resumed["epochs"] == 3
    _assert_same_run(straight, resumed, tmp_path / "straight" / "checkpoints" / "last.ckpt", part1_last)


def _epoch_lrs(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [float(r["lr-AdamW"]) for r in csv.DictReader(f) if r.get("lr-AdamW")]  # once per epoch, in order


@pytest.mark.slow
def test_extending_a_finished_run_continues_the_cosine_without_cycling(tiny_cfg, tmp_path, caplog):
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    train(tiny_cfg(*fast, "trainer.max_epochs=2", output="a"))
    first = _epoch_lrs(tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO, logger="fmnist_tl.training.model"):
        train(tiny_cfg(*fast, "trainer.max_epochs=5", f"ckpt_path={last}", output="b"))
    extended = _epoch_lrs(tmp_path / "b")
    assert first == pytest.approx([1e-3, 0.5e-3])
    assert len(extended) == 3  # epochs 2, 3, 4
    # From the LR of the last trained epoch down a cosine that ends at epoch 5: never back up, never 0.
    lrs = first + extended
    assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] > 0
    assert extended == pytest.approx([0.5e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)])
    said = [r.getMessage() for r in caplog.records if r.name == "fmnist_tl.training.model"]
    assert len(said) == 1 and said[0].startswith("Extending the run from trainer.max_epochs=2")
    assert "re-planned" in said[0]
    assert torch.load(last, weights_only=True)["lr_plan"]["max_epochs"] == 5


@pytest.mark.slow
def test_one_cycle_is_not_extended_and_the_schedule_kind_must_match(tiny_cfg, tmp_path):
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    train(tiny_cfg(*fast, "model/scheduler=onecycle", output="a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(FmnistError, match=r"one-cycle .* trainer.max_epochs=1, which cannot be re-planned to 2"):
        train(tiny_cfg(*fast, "model/scheduler=onecycle", "trainer.max_epochs=2", f"ckpt_path={last}", output="b"))
    with pytest.raises(FmnistError, match="trained with LR schedule OneCycleLR, this config has CosineAnnealingLR"):
        train(tiny_cfg(*fast, "trainer.max_epochs=2", f"ckpt_path={last}", output="c"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_checkpoint_without_a_recorded_plan_still_resumes_and_extends(tiny_cfg, tmp_path):
    """A checkpoint from before lr_plan existed: its cosine is a CosineAnnealingLR state."""
    fast = ("+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false")
    train(tiny_cfg(*fast, "trainer.max_epochs=2", output="a"))
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["lr_plan"]
    ckpt["lr_schedulers"] = [
        {"T_max": 2, "eta_min": 0.0, "base_lrs": [1e-3], "last_epoch": 2, "_step_count": 3, "_last_lr": [0.0]}
    ]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    train(tiny_cfg(*fast, "trainer.max_epochs=4", f"ckpt_path={old}", output="b"))
    assert _epoch_lrs(tmp_path / "b") == pytest.approx([0.5e-3 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)])


@pytest.mark.slow
def test_last_never_picks_exception_checkpoint(tiny_cfg, tmp_path):
    """ckpt_path=last resolves to checkpoints/last.ckpt only, never on_exception.ckpt."""
    train(tiny_cfg(output="logs/train/runs/a"))
    ckpts = tmp_path / "logs" / "train" / "runs" / "a" / "checkpoints"
    time.sleep(0.05)
    (ckpts / "on_exception.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes())
    cfg = tiny_cfg("ckpt_path=last", "trainer.max_epochs=2", output="logs/train/runs/b")
    assert resolve_ckpt_path(cfg) == str(ckpts / "last.ckpt")


# ---------------------------------------------------------------- 6. NaN / Inf


@pytest.mark.slow
def test_diverging_lr_stops_with_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(FmnistError, match="training diverged: loss is nan.*lower model.optimizer.lr"):
        train(tiny_cfg("model.optimizer.lr=1e6", "trainer.max_epochs=3"))
    # Nothing diverged was saved as last.ckpt.
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_injected_nan_keeps_best_checkpoint_finite(tiny_cfg, tmp_path, monkeypatch):
    original = TransferClassifier.logits

    def nan_in_second_epoch(self, x):
        out = original(self, x)
        return out * float("nan") if self.training and self.current_epoch == 1 else out

    monkeypatch.setattr(TransferClassifier, "logits", nan_in_second_epoch)
    with pytest.raises(FmnistError, match="training diverged"):
        train(tiny_cfg("trainer.max_epochs=3"))
    ckpts = tmp_path / "run" / "checkpoints"
    best = torch.load(ckpts / "epoch_000.ckpt", weights_only=True)
    scores = [cb["best_model_score"] for k, cb in best["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert scores and all(torch.isfinite(s) for s in scores)
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_diverging_run_cli_exit_code(tiny_mirror, tmp_path):
    proc = run_cli(*tiny_overrides(tiny_mirror, tmp_path), "model.optimizer.lr=1e6", "trainer.max_epochs=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training diverged")


# ---------------------------------------------------------------- 7. disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_enospc_on_checkpoint_keeps_previous(tiny_cfg, tmp_path, monkeypatch):
    train(tiny_cfg())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    monkeypatch.setattr(callbacks_mod.torch, "save", _enospc)
    with pytest.raises(FmnistError, match=r"/checkpoints/(epoch_\d+|last)\.ckpt: no space left on device"):
        train(tiny_cfg("trainer.max_epochs=2", f"ckpt_path={last}", output="run"))
    assert last.read_bytes() == before
    assert not list(last.parent.glob("*.tmp"))


def test_enospc_on_metrics_json_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(FmnistError, match="metrics.json: no space left on device"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---------------------------------------------------------------- 8. concurrency


@pytest.mark.slow
def test_two_runs_started_together_get_separate_dirs(tiny_mirror, tmp_path):
    args = [*tiny_overrides(tiny_mirror, tmp_path), "debug=fdr"]
    procs = [start_cli(*args, stdout=subprocess.DEVNULL) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    dirs = list((tmp_path / "logs" / "debug" / "runs").iterdir())
    assert len(dirs) == 2
    assert all(json.loads((d / "metrics.json").read_text())["status"] == "completed" for d in dirs)


def test_pickle_marker_payload_is_live():
    """Guards the malicious-file tests: the payload really would run on a plain unpickle."""
    blob = pickle.dumps(RunsCode("/nonexistent-dir/marker"))
    with pytest.raises(FileNotFoundError):
        pickle.loads(blob)


@pytest.mark.slow
def test_enospc_on_feature_cache_keeps_existing_entries(tiny_cfg, tmp_path, monkeypatch):
    first = train(tiny_cfg(output="a"))
    assert {v["status"] for v in first["feature_cache"].values()} == {"extracted"}
    entries = {p: p.read_bytes() for p in (tmp_path / "cache" / "features").iterdir()}
    monkeypatch.setattr(os, "fsync", _enospc)
    # Another image size is another cache key: its write hits the full disk.
    with pytest.raises(FmnistError, match=r"\.(safetensors|json): no space left on device"):
        train(tiny_cfg("model.image_size=64", output="b"))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in entries} == entries
    assert not list((tmp_path / "cache" / "features").glob(".*.tmp"))
    again = train(tiny_cfg(output="c"))
    assert {v["status"] for v in again["feature_cache"].values()} == {"hit"}


@pytest.mark.slow
def test_enospc_on_report_keeps_previous_report(tiny_cfg, tmp_path, monkeypatch):
    train(tiny_cfg())
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("report.json", "report.md", "confusion_matrix.png")}
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(FmnistError, match=r"(report\.(json|md)|\.png): no space left on device"):
        train(tiny_cfg())
    # The second run into the same run dir set the first one aside (docs/failures.md) before writing.
    (aside,) = run.glob("previous-*")
    assert {name: (aside / name).read_bytes() for name in before} == before
    assert not list(run.glob(".*.tmp"))
