"""Helpers the tests import: tiny IDX data, Hydra configs pointed at temp dirs, running the CLIs.

Fixtures live in conftest.py (pytest finds them there); plain functions and constants live here,
so tests import them from one ordinary module. Everything runs offline: model.weights=null
(random init) unless a test saves its own state_dict.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fmnist_tl.config.compose import compose_config
from fmnist_tl.data.raw_files import IDX_FILES, IDX_MAGIC

REPO = Path(__file__).resolve().parent.parent
DEBIAN_MIRROR = Path("/usr/share/datasets/fashion-mnist")
TINY_SIZES = {"train": 400, "test": 100}
# Two CPU processes under DDP (conf/trainer/ddp_sim.yaml), in fp32 so ranks agree exactly.
DDP_SIM = ("trainer=ddp_sim", "trainer.accelerator=cpu", "trainer.precision=32-true")

needs_real_data = pytest.mark.skipif(
    not (DEBIAN_MIRROR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)",
)


def idx_bytes(kind: str, data: torch.Tensor) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    return IDX_MAGIC[kind].to_bytes(4, "big") + dims + data.to(torch.uint8).numpy().tobytes()


def tiny_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake Fashion-MNIST: each class is a fixed random blob pattern plus noise."""
    g = torch.Generator().manual_seed(1234)
    templates = (torch.rand(10, 28, 28, generator=g) > 0.6).float() * 200
    g.manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = (templates[labels] + torch.rand(n, 28, 28, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    return images, labels.to(torch.uint8)


def write_tiny_mirror(root: Path, sizes: dict[str, int] = TINY_SIZES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": tiny_split(sizes["train"], 0), "test": tiny_split(sizes["test"], 1)}
    for stem, kind, split in IDX_FILES:
        images, labels = splits[split]
        (root / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(kind, images if kind == "images" else labels)))
    return root


def tiny_data_overrides(mirror: Path, tmp: Path) -> list[str]:
    """Data, paths and trainer overrides for evaluate/export configs on the tiny mirror."""
    return [
        f"paths.root_dir={tmp}",
        f"data.mirror_dir={mirror}",
        "data.expected_sizes.train=400",
        "data.expected_sizes.test=100",
        "data.val_size=100",
        "data.eval_batch_size=64",
    ]


def tiny_overrides(mirror: Path, tmp: Path) -> list[str]:
    """Overrides for a seconds-long offline run on the tiny mirror."""
    return [
        *tiny_data_overrides(mirror, tmp),
        "model.image_size=32",
        "data.batch_size=32",
        "model.backbone=resnet18",
        "model.weights=null",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
    ]


def attached(dm: L.LightningDataModule, model: L.LightningModule) -> L.Trainer:
    """A trainer holding `model`, as fit/test make one, so the datamodule's hooks see the model."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    dm.trainer = trainer
    return trainer


def compose_cfg(config_name: str = "train", overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """Compose the packaged configs as the CLIs do, outside a Hydra run."""
    return compose_config(config_name, overrides, return_hydra_config=hydra)


def make_entry_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml as its CLI would, with the run directory set to output_dir."""
    cfg = compose_cfg(config_name, overrides, hydra=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def make_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    return make_entry_cfg("train", overrides, output_dir)


def _cli(module: str, args: tuple[str, ...], env: dict | None) -> dict:
    """How the tests start a module as a user would: from the repo root, warnings off."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return {"args": [sys.executable, "-m", module, *args], "text": True, "cwd": REPO, "env": full_env}


def run_cli(*args: str, env: dict | None = None, module: str = "fmnist_tl.train", timeout: int = 300):
    """Run a module as a user would; returns the CompletedProcess."""
    return subprocess.run(**_cli(module, args, env), capture_output=True, timeout=timeout)


def start_cli(
    *args: str, stdout=subprocess.PIPE, module: str = "fmnist_tl.train", env: dict | None = None
) -> subprocess.Popen:
    """Start a module as a user would, without waiting; stderr is piped for the failure message."""
    return subprocess.Popen(**_cli(module, args, env), stdout=stdout, stderr=subprocess.PIPE)


def unreachable_network_env(tmp: Path) -> dict[str, str]:
    """Environment for a subprocess whose downloads fail at once, with or without a real network.

    An empty torch hub cache, and every proxy variable pointing at the discard port of this host,
    where nothing listens: urllib (torch.hub, torchvision) gets "connection refused" immediately.
    """
    proxy = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp / "torch-home")}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


class RunsCode:
    """A pickle payload that touches `marker` when unpickled: proof that a load ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
