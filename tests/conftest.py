"""Shared fixtures: tiny IDX data written to disk, and configs pointed at temp dirs.

The functions behind them (and the ones tests call directly) are in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

# Two xdist workers, and the CLIs and DDP ranks they start, share the cores: an OpenMP thread that
# spins while it waits takes a core from the other worker. Set before tests.helpers imports torch
# (libgomp reads it when it loads); subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.helpers import make_cfg, tiny_overrides, write_tiny_mirror  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    return write_tiny_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture
def tiny_cfg(tiny_mirror, tmp_path):
    def build(*extra: str, output: str = "run") -> DictConfig:
        return make_cfg(tiny_overrides(tiny_mirror, tmp_path) + list(extra), tmp_path / output)

    return build


@pytest.fixture(scope="session")
def trained_run(tiny_mirror, tmp_path_factory) -> Path:
    """Run dir of one 2-epoch train() on the tiny data (resnet18, 32 px, fp32): checkpoints, metrics, report."""
    from fmnist_tl.train import train

    tmp = tmp_path_factory.mktemp("trained")
    train(make_cfg([*tiny_overrides(tiny_mirror, tmp), "trainer.max_epochs=2"], tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory) -> Path:
    """A head-only checkpoint of resnet18 trained on in-memory colour images with their own class names
    (tests/colour_data.py): what a run on a folder of images gives to evaluate, predict and export."""
    from tests.colour_data import train_colour_checkpoint

    return train_colour_checkpoint(tmp_path_factory.mktemp("colour"))


# Fixtures that train a model. A test that uses one, directly or through another fixture, trains,
# so it is marked slow (the fast lane, `pytest -m "not slow"`, skips it) whether or not it says so.
TRAINING_FIXTURES = {"trained_run", "head_ckpt", "colour_checkpoint", "fashion_checkpoint"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
