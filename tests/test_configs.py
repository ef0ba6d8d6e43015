from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fmnist_tl.train import CONFIG_DIR, validate_config
from fmnist_tl.utils import FmnistError
from tests.conftest import run_cli

GROUPS = ["data", "model", "trainer", "callbacks", "logger", "experiment", "debug", "hparams_search"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in group_options(g)], ids=lambda s: s)
def test_every_config_composes(override):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[override])
    # output_dir only exists inside a Hydra run.
    cfg.paths.output_dir = "/tmp/x"
    container = OmegaConf.to_container(cfg.model, resolve=True)
    assert container["_target_"] == "fmnist_tl.model.TransferClassifier"
    OmegaConf.to_container(cfg.data, resolve=True)
    OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.callbacks is not None:
        OmegaConf.to_container(cfg.callbacks, resolve=True)
    validate_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.optimizer.lr=-1", "model.optimizer.lr=-1 must be a positive"),
        ("model.optimizer.lr=abc", "model.optimizer.lr='abc' must be a number"),
        ("model.backbone=vgg99", "model.backbone=vgg99 is not supported"),
        ("model.weights=IMAGENET1K_V9", "model.weights=IMAGENET1K_V9 is not a torchvision weights name"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("data.image_size=16", "data.image_size=16 must be an integer >= 32"),
        ("+nonexistent=1", "unknown config key 'nonexistent'"),
        ("model.head.dropout=1.5", "model.head.dropout=1.5 must be in"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt does not exist"),
    ],
)
def test_bad_values_rejected_by_validation(override, message):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[override])
    with pytest.raises(FmnistError, match=re.escape(message)):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override",
    ["model.optimizer.lr=-1", "model.backbone=vgg99", "+nonexistent=1", "data.batch_size=0", "model.optimizer.lr=abc"],
)
def test_cli_bad_override_one_line_exit_nonzero(override, tmp_path):
    proc = run_cli(override, f"paths.root_dir={tmp_path}", "model.weights=null")
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert err_lines and err_lines[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    # Nothing was trained: no checkpoint anywhere under the run root.
    assert not list(tmp_path.rglob("*.ckpt"))


def test_slurm_launcher_asks_for_what_the_trainer_uses():
    """hydra/launcher=slurm: one task per GPU on each node, so Lightning's DDP takes its ranks from SLURM."""
    GlobalHydra.instance().clear()
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[*overrides, "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 60
    assert launcher["cpus_per_task"] and launcher["mem_gb"] and launcher["array_parallelism"]
